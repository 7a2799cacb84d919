"""Standing fuzz suite (tests/python/fuzz.py): random, mutated and structurally hostile requests against
every RPC of both ports, on a server of its own (private repository copy, admin token). Bounded for
`make test` (FUZZ_CALLS, default 2500 calls, about 25 s on 2 cores, stopped at FUZZ_BUDGET_S = 90 s in any
case); `make fuzz` runs a long one with a fresh seed. FUZZ_SEED replays a run. Prints seed and counts by status and kind.

Asserts: no status that blames the server (INTERNAL, UNKNOWN, DATA_LOSS), no crash (UNAVAILABLE, the
process gone), no hang (per-call deadline), and the same answers to a fixed set of valid requests after
the run as before it."""
import json
import os
import shutil

import grpc
import numpy as np
import pytest

from adapterdrop_tools.served import Server

from . import fuzz, wire
from .conftest import _ort_library, _server_binary, _test_repo

TOKEN = "fuzz-admin-token"
CALLS = int(os.environ.get("FUZZ_CALLS", "2500"))
SEED = int(os.environ.get("FUZZ_SEED", "20261130"))
TIMEOUT_S = float(os.environ.get("FUZZ_CALL_TIMEOUT_S", "20"))
# The run stops when this is spent (make test's bound: the whole suite within 2 minutes on 2 cores).
BUDGET_S = float(os.environ.get("FUZZ_BUDGET_S", "90" if CALLS <= 2500 else "inf"))
BACKBONES = ("bert-tiny", "roberta-tiny")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("fuzz-repo")
    src = _test_repo()
    for b in BACKBONES:
        shutil.copytree(src / "backbones" / b, repo / "backbones" / b)
    for task in sorted((src / "tasks").iterdir()):
        manifests = list(task.glob("*/task.json"))
        if manifests and json.loads(manifests[0].read_text())["backbone"] in BACKBONES:
            shutil.copytree(task, repo / "tasks" / task.name)
    try:
        srv = Server(_server_binary(), repo, timeout_s=120,
                     extra_env={"ORT_DYLIB_PATH": str(_ort_library()), "ADAPTERDROP__AUTH__ADMIN_TOKEN": TOKEN,
                                "ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S": "0", "ADAPTERDROP__LOG__LEVEL": "warn,adapterdrop_serve::server=info"})
        admin = srv.admin_addr()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield srv, admin, repo
    srv.stop(30)


def fixed_answers(channels) -> dict:
    """Answers to a fixed set of valid requests, without anything that legitimately varies (timings, ids)."""
    corpus = fuzz.valid_corpus(_test_repo() / "tasks" / "sent" / "1")
    out = {}
    infer = next(m for m in wire.methods(wire.NATIVE) if m.name == "Infer")
    resp_cls = wire.message("adapterdrop.v1.InferResponse")
    for i, payload in enumerate(corpus[infer.path]):
        code, details, raw = wire.call(channels["inference"], infer, payload, 60)
        assert code == grpc.StatusCode.OK, details
        r = resp_cls.FromString(raw[0])
        out[f"native {i}"] = [(t.task, t.version, list(t.dropped_layers), [(list(s.logits), s.label) for s in t.sequences])
                              for t in r.results]
    mi = next(m for m in wire.methods(wire.KSERVE) if m.name == "ModelInfer")
    resp_cls = wire.message("inference.ModelInferResponse")
    for i, payload in enumerate(corpus[mi.path]):
        code, details, raw = wire.call(channels["inference"], mi, payload, 60)
        assert code == grpc.StatusCode.OK, details
        r = resp_cls.FromString(raw[0])
        out[f"kserve {i}"] = [(o.name, o.datatype, list(o.shape)) for o in r.outputs] + [bytes(c) for c in r.raw_output_contents]
    lt = next(m for m in wire.methods(wire.NATIVE) if m.name == "ListTasks")
    code, details, raw = wire.call(channels["inference"], lt, [b""], 60)
    assert code == grpc.StatusCode.OK, details
    tasks = wire.message("adapterdrop.v1.ListTasksResponse").FromString(raw[0]).tasks
    out["tasks"] = sorted((t.name, t.version, t.status) for t in tasks if not t.name.startswith("fz-"))
    return out


def assert_same(before, after):
    assert before.keys() == after.keys()
    for key in before:
        if key.startswith("native"):
            for (tb, vb, db, sb), (ta, va, da, sa) in zip(before[key], after[key], strict=True):
                assert (tb, vb, db) == (ta, va, da), key
                for (lb, labb), (la, laba) in zip(sb, sa, strict=True):
                    np.testing.assert_allclose(la, lb, atol=1e-6, err_msg=key)
                    assert laba == labb, key
        elif key.startswith("kserve"):
            meta_b = [x for x in before[key] if isinstance(x, tuple)]
            meta_a = [x for x in after[key] if isinstance(x, tuple)]
            assert meta_a == meta_b, key
            for rb, ra in zip([x for x in before[key] if isinstance(x, bytes)], [x for x in after[key] if isinstance(x, bytes)], strict=True):
                assert len(ra) == len(rb), key
                if rb != ra:  # FP32 outputs: equal within 1e-6 (labels are BYTES and must be identical)
                    np.testing.assert_allclose(np.frombuffer(ra, np.float32), np.frombuffer(rb, np.float32), atol=1e-6, err_msg=key)
        else:
            assert after[key] == before[key], key


def test_fuzz_every_rpc_of_both_ports(fuzz_server, capsys):
    srv, admin, repo = fuzz_server
    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    with grpc.insecure_channel(srv.addr, options=options) as inference, grpc.insecure_channel(admin, options=options) as adm:
        channels = {"inference": inference, "admin": adm}
        before = fixed_answers(channels)
        known = os.environ.get("FUZZ_KNOWN_OPEN")
        known_open = fuzz.KNOWN_OPEN if known is None else [k for k in known.split(",") if k]
        fz = fuzz.Fuzzer(SEED, _test_repo() / "tasks" / "sent" / "1", known_open)
        report = fz.run(channels, CALLS, TIMEOUT_S, [("authorization", f"Bearer {TOKEN}")],
                        lambda: srv.proc.poll() is None, BUDGET_S)
        with capsys.disabled():  # seed and counts show in every run, not only in failures
            print("\n" + report.summary() + f"\n  registrations attempted: {fz.registrations}; known open (avoided): "
                  f"{sorted(fz.known_open)}")
        log_tail = "".join(srv.logs[-40:])
        assert not report.failures, (f"{report.summary()}\nfirst failures (replay with FUZZ_SEED={SEED}):\n"
                                     + "\n".join(json.dumps(f) for f in report.failures[:10]) + f"\nserver log tail:\n{log_tail}")
        assert srv.proc.poll() is None, f"the server died:\n{log_tail}"
        # Every status was seen for a reason: the run reached past decoding into validation and serving.
        assert report.by_status["INVALID_ARGUMENT"] > 0 and report.by_status["OK"] > 0, report.summary()
        assert_same(before, fixed_answers(channels))
