"""Exported graphs, composed as the server composes them, against the library and the reference."""
import os

import numpy as np
import pytest
from conftest import FIX

from adapterdrop_tools.adapterhub import load_adapter, load_head
from adapterdrop_tools.checkpoint import load_checkpoint
from adapterdrop_tools.pipeline import BackboneRunner, Pipeline
from adapterdrop_tools.reference import Reference, pad_batch
from adapterdrop_tools.testrepo import as_arrays, load_expected

LIB_TOL = 1e-4


def pipe(repo, task, cache):
    return Pipeline(repo, task, 1, cache)


@pytest.mark.parametrize("task", ["sent", "topic", "score"])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_bert_tiny_vs_library(test_repo, backbone_cache, bert_fixture, task, n):
    p, r = pipe(test_repo, task, backbone_cache), bert_fixture
    got = p.logits(r["input_ids"], r["attention_mask"], None, range(n))
    assert np.abs(got - np.array(r["logits"][task][str(n)])).max() <= LIB_TOL
    got = p.logits(r["pair_input_ids"], r["pair_attention_mask"], r["pair_token_type_ids"], range(n))
    assert np.abs(got - np.array(r["pair_logits"][task][str(n)])).max() <= LIB_TOL


@pytest.mark.parametrize("n", [0, 1, 2])
def test_roberta_tiny_vs_library(test_repo, backbone_cache, roberta_fixture, n):
    r = roberta_fixture
    got = pipe(test_repo, "rsent", backbone_cache).logits(r["input_ids"], r["attention_mask"], None, range(n))
    assert np.abs(got - np.array(r["logits"]["sent"][str(n)])).max() <= LIB_TOL


def check_against_expected(repo, task, cache, tol):
    exp = load_expected(repo)
    t = exp["tasks"][task]
    pad = exp["backbones"][t["backbone"]]["pad_token_id"]
    p = Pipeline(repo, task, 1, cache)
    assert p.task.manifest["drop"] == t["drop"]
    checked = 0
    for case in t["cases"]:
        ids, mask, tt = as_arrays(case, pad)
        for n, want in case["logits"].items():
            got = p.logits(ids, mask, tt, range(int(n)))
            assert np.abs(got - np.array(want)).max() <= tol, (task, case["name"], n)
            checked += 1
        dropped = p.task.manifest["drop"].get("layers", range(p.task.manifest["drop"].get("drop_first", 0)))
        got = p.logits(ids, mask, tt, dropped)
        assert np.abs(got - np.array(case["default_logits"])).max() <= tol
    return checked


@pytest.mark.parametrize("task", ["sent", "topic", "score", "sent-spec", "sent-layers", "rsent",
                                  "rand-pfeiffer", "rand-houlsby"])
def test_pipeline_vs_reference_expected(test_repo, backbone_cache, task):
    check_against_expected(test_repo, task, backbone_cache, 1e-4)


def test_random_tasks_drop_changes_logits(test_repo):
    for task in ("rand-pfeiffer", "rand-houlsby"):
        logits = load_expected(test_repo)["tasks"][task]["cases"][0]["logits"]
        for n in range(3):
            assert np.abs(np.array(logits[str(n)]) - np.array(logits[str(n + 1)])).max() > 1e-2, (task, n)


def test_expected_library_agreement(test_repo, bert_fixture):
    """expected.json (reference) equals the library logits for the fixture tasks."""
    exp = load_expected(test_repo)["tasks"]
    for task in ("sent", "topic", "score"):
        for n in range(3):
            assert np.abs(np.array(exp[task]["cases"][0]["logits"][str(n)])
                          - np.array(bert_fixture["logits"][task][str(n)])).max() <= 1e-5
            assert np.abs(np.array(exp[task]["cases"][1]["logits"][str(n)])
                          - np.array(bert_fixture["pair_logits"][task][str(n)])).max() <= 1e-5


@pytest.mark.parametrize("backbone,ckdir", [
    ("bert-tiny", os.path.join(FIX, "bert-tiny", "backbone")),
    ("roberta-tiny", os.path.join(FIX, "roberta-tiny", "backbone")),
    ("tiny-random", None)])
def test_plain_segments_equal_uncut_layer(test_repo, backbone_cache, backbone, ckdir):
    ckdir = ckdir or os.path.join(test_repo, "sources", "tiny-random", "backbone")
    ref = Reference(load_checkpoint(ckdir))
    bb = backbone_cache.get(backbone) or backbone_cache.setdefault(backbone, BackboneRunner(test_repo, backbone))
    rng = np.random.default_rng(0)
    pad = ref.ck.pad_token_id
    ids, mask, tt = pad_batch([[5, 17, 42, 99, 7], [5, 8, 9]], pad)
    x = bb.embeddings(ids, tt)
    assert np.abs(x - ref.embeddings(ids, tt)).max() <= 1e-5
    x = x + rng.standard_normal(x.shape).astype(np.float32) * 0.1
    for i in range(ref.ck.num_layers):
        got = bb.layer(i, x, mask)
        want = ref.layer(i, x.astype(np.float64), mask)
        assert np.abs(got - want).max() <= 1e-5, (backbone, i)
        x = got


@pytest.mark.parametrize("task", ["topic", "rsent", "rand-houlsby", "rand-pfeiffer"])
def test_batching_padding_invariance(test_repo, backbone_cache, task):
    p = pipe(test_repo, task, backbone_cache)
    pad = int(p.backbone.manifest["pad_token_id"])
    short = [0 if p.backbone.manifest["architecture"] == "roberta" else 101, 12, 13, 2 if pad == 1 else 102]
    longer = [short[0]] + list(range(20, 40)) + [short[-1]]
    mid = [short[0]] + list(range(50, 60)) + [short[-1]]
    for n in (0, 1):
        alone = p.logits(*pad_batch([short], pad)[:2], None, range(n))
        ids, mask, tt = pad_batch([longer, short, mid], pad)
        batched = p.logits(ids, mask, tt, range(n))
        assert np.abs(alone[0] - batched[1]).max() <= 1e-5, (task, n)


def test_tiny_random_onnx_vs_reference_direct(test_repo, backbone_cache):
    """Independent of expected.json: ONNX vs reference on the seeded random backbone, all n, pairs."""
    src = os.path.join(test_repo, "sources", "tiny-random")
    ref = Reference(load_checkpoint(os.path.join(src, "backbone")))
    for task, d in (("rand-pfeiffer", "rand-pfeiffer"), ("rand-houlsby", "rand-houlsby")):
        adir = os.path.join(src, "adapters", d)
        adapter, head = load_adapter(adir, 3, 32), load_head(adir, 32)
        p = pipe(test_repo, task, backbone_cache)
        ids, mask, tt = pad_batch([[101, 7, 8, 102, 9, 10, 102], [101, 2000, 102, 3000, 102]], 0,
                                  [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
        for n in range(4):
            want = ref.logits(ids, mask, tt, adapter, head, range(n))
            assert np.abs(p.logits(ids, mask, tt, range(n)) - want).max() <= 1e-4, (task, n)
