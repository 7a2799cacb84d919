"""The trained Turkish part-of-speech tagger (models/trained/pos-tr-robust, tools/train/train_tagging.py)
registered at run time from its committed AdapterHub directory (`register_task.py --weights-only`) and
asked over gRPC: for the first test sentences (read from the turkish-treebanks wheel, never committed)
the served token logits must equal the library's recorded at train time (golden.json, n = 0, 3, 6) and
the served word tags must be the library's at every n = 0..6."""
import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from adapterdrop_tools import datasets_tagging, served_tagging
from adapterdrop_tools.served import Server

from .conftest import _server_binary, _test_repo

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "models" / "trained" / "pos-tr-robust"
TOLERANCE = 1e-3  # as tests/python/test_trained_golden.py: PyTorch vs ONNX Runtime over 6 layers


@pytest.fixture(scope="module")
def golden():
    return json.loads((RUN / "golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tagger(tmp_path_factory, pb, pb_grpc):
    src = _test_repo()
    if not (src / "backbones" / "minilm" / "backbone.json").is_file():
        pytest.fail(f"{src} has no minilm backbone; run `make test-repo` first", pytrace=False)
    repo = served_tagging.backbone_repo(str(tmp_path_factory.mktemp("tagging") / "repo"), str(src))
    with Server(_server_binary(), repo) as srv:
        served_tagging.register(srv, RUN, "pos-tr")
        ch = grpc.insecure_channel(srv.addr)
        yield pb_grpc.InferenceStub(ch)
        ch.close()


def test_served_tags_match_the_library(golden, tagger, pb):
    sentences = datasets_tagging.check_recorded()["test"].sentences[:golden["count"]]
    got = served_tagging.served(tagger, pb, "pos-tr", [s.text for s in sentences], range(7))
    for n in range(7):
        assert [served_tagging.word_tags(s, q) for s, q in zip(sentences, got[n])] == golden["word_tags"][str(n)], n
    worst, prev = 0.0, None
    for n, want in golden["logits"].items():
        rows = []
        for seq, w in zip(got[int(n)], want):
            w = np.asarray(w, dtype=np.float32)
            assert len(seq.tokens) == len(w), n
            rows.append(np.asarray(seq.logits, dtype=np.float32).reshape(w.shape))
            worst = max(worst, float(np.abs(rows[-1] - w).max()))
        assert worst <= TOLERANCE, f"n={n}: max abs {worst} > {TOLERANCE}"
        if prev is not None:  # the drop depth really changes what is computed
            assert max(float(np.abs(a - b).max()) for a, b in zip(rows, prev)) > 1e-3, n
        prev = rows


def test_tags_are_treebank_tags_and_mostly_right(golden, tagger, pb):
    """Every served label is one of the treebank's UPOS tags; at n = 0 most words are right (the library
    itself scores golden['pytorch_test_accuracy'] on the whole split)."""
    sentences = datasets_tagging.check_recorded()["test"].sentences[:golden["count"]]
    got = served_tagging.served(tagger, pb, "pos-tr", [s.text for s in sentences], [0])[0]
    assert {w.label for q in got for w in q.words} <= set(datasets_tagging.LABELS)
    acc, words = served_tagging.accuracy(sentences, got)
    assert words >= 40 and acc >= 0.5, (acc, words)
