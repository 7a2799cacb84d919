"""Issue 14 sequence heads on the wire: the built-in `<backbone>/embedding` task, multi-label and
multiple-choice tasks through grpcio (native API) and tritonclient (KServe v2), outputs named and
shaped as the README says and equal to the AdapterHub library's (tests/fixtures/adapterhub-breadth)
within 1e-4; bad input gets INVALID_ARGUMENT naming what to change; a multi-label adapter registers
weights-only with tools/register_task.py and its threshold. Repository: a copy of `make breadth-repo`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest


grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (make setup)")
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "adapterhub-breadth"
TOL = 1e-4


def _fx(backbone):
    return json.loads((FIXTURES / backbone / "reference.json").read_text())


@pytest.fixture(scope="module")
def served(breadth_server):
    srv = breadth_server("bert", ("bert-multilabel", "bert-choice", "bert-pfeiffer"))
    triton = grpcclient.InferenceServerClient(srv.addr)
    yield {"server": srv, "triton": triton}
    triton.close()


@pytest.fixture(scope="module")
def native(served, pb, pb_grpc):
    ch = grpc.insecure_channel(served["server"].addr)
    yield pb, pb_grpc.InferenceStub(ch)
    ch.close()


def _bytes(name, rows):
    arr = np.array([[v.encode() for v in row] for row in rows], dtype=object)
    t = grpcclient.InferInput(name, list(arr.shape), "BYTES")
    t.set_data_from_numpy(arr)
    return t


def test_native_embedding_multilabel_and_choice(native):
    pb, stub = native
    fx = _fx("bert")
    req = pb.InferRequest(tasks=[pb.TaskRef(name="bert-multilabel", drop_first=2, threshold=0.3),
                                 pb.TaskRef(name="bert/embedding")], texts=pb.Texts(texts=fx["texts"]))
    resp = stub.Infer(req)
    want = np.array(fx["tasks"]["multilabel"]["outputs"]["2"]["logits"])
    multi, emb = resp.results
    np.testing.assert_allclose([list(s.logits) for s in multi.sequences], want, atol=TOL, rtol=0)
    for s, w in zip(multi.sequences, want):
        above = [i for i, x in enumerate(1 / (1 + np.exp(-w))) if x > 0.3]
        assert (list(s.label_indices), list(s.labels), s.threshold) == (above, [f"topic{i}" for i in above],
                                                                         pytest.approx(0.3))
    np.testing.assert_allclose([list(s.embedding) for s in emb.sequences], fx["embedding"]["mean"], atol=TOL, rtol=0)
    items = [pb.ChoiceInput(context=c, choices=ch) for c, ch in fx["choices"]]
    resp = stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name="bert-choice", drop_first=1)], choices=pb.Choices(items=items)))
    got = [list(s.logits) for s in resp.results[0].sequences]
    np.testing.assert_allclose(got, fx["tasks"]["choice"]["outputs"]["1"]["logits"], atol=TOL, rtol=0)
    best = [int(np.argmax(r)) for r in got]
    assert [s.label_index for s in resp.results[0].sequences] == best
    assert [s.label for s in resp.results[0].sequences] == [fx["choices"][i][1][b] for i, b in enumerate(best)]
    listed = {t.name: t.head_type for t in stub.ListTasks(pb.ListTasksRequest()).tasks}
    assert listed["bert/embedding"] == "embedding" and listed["bert-choice"] == "multiple_choice"
    one = pb.Choices(items=[pb.ChoiceInput(context="q", choices=["only one"])])
    with pytest.raises(grpc.RpcError) as e:
        stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name="bert-choice")], choices=one))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs.choices.items[0].choices" in e.value.details()


def test_kserve_outputs_are_named_and_shaped_for_triton_users(served):
    c = served["triton"]
    fx = _fx("bert")
    text = _bytes("TEXT", [[t] for t in fx["texts"]])
    r = c.infer("bert/embedding", [text])
    assert r.as_numpy("embedding").shape == (4, 32) and r.as_numpy("embedding").dtype == np.float32
    np.testing.assert_allclose(r.as_numpy("embedding"), fx["embedding"]["mean"], atol=TOL, rtol=0)
    meta = c.get_model_metadata("bert/embedding")
    assert [(o.name, o.datatype, list(o.shape)) for o in meta.outputs] == [("embedding", "FP32", [-1, 32])]

    r = c.infer("bert-multilabel", [text], parameters={"threshold": 0.6, "drop_first": 3, "tasks": "bert/embedding"})
    logits = np.array(fx["tasks"]["multilabel"]["outputs"]["3"]["logits"])
    np.testing.assert_allclose(r.as_numpy("logits"), logits, atol=TOL, rtol=0)
    np.testing.assert_allclose(r.as_numpy("probabilities"), 1 / (1 + np.exp(-logits)), atol=TOL, rtol=0)
    assert r.as_numpy("predicted").dtype == np.bool_
    assert (r.as_numpy("predicted") == (1 / (1 + np.exp(-logits)) > 0.6)).all()
    np.testing.assert_allclose(r.as_numpy("bert/embedding/embedding"), fx["embedding"]["mean"], atol=TOL, rtol=0)
    meta = c.get_model_metadata("bert-multilabel")
    assert [(o.name, o.datatype, list(o.shape)) for o in meta.outputs] == [
        ("logits", "FP32", [-1, 4]), ("probabilities", "FP32", [-1, 4]), ("predicted", "BOOL", [-1, 4])]

    contexts = _bytes("TEXT", [[c0] for c0, _ in fx["choices"]])
    choices = _bytes("CHOICES", [ch for _, ch in fx["choices"]])
    r = c.infer("bert-choice", [contexts, choices])
    want = np.array(fx["tasks"]["choice"]["outputs"]["0"]["logits"])
    np.testing.assert_allclose(r.as_numpy("logits"), want, atol=TOL, rtol=0)
    assert r.as_numpy("probabilities").shape == (2, 3)
    assert r.as_numpy("choice").tolist() == [[int(i)] for i in np.argmax(want, axis=1)]
    labels = [row[0].decode() for row in r.as_numpy("label")]
    assert labels == [fx["choices"][i][1][int(b)] for i, b in enumerate(np.argmax(want, axis=1))]
    meta = c.get_model_metadata("bert-choice")
    assert [(i.name, list(i.shape)) for i in meta.inputs] == [("TEXT", [-1, 1]), ("CHOICES", [-1, -1])]


@pytest.mark.parametrize("inputs,params,says", [
    (lambda fx: [_bytes("TEXT", [["q"]]), _bytes("CHOICES", [["one"]])], {}, "CHOICES` has 1 choice per item"),
    (lambda fx: [_bytes("TEXT", [["q"], ["r"]]), _bytes("CHOICES", [["a", "b"]])], {}, "has 1 items but `TEXT` has 2"),
    (lambda fx: [_bytes("TEXT", [["q"]])], {}, "multiple-choice task"),
    (lambda fx: [_bytes("TEXT", [["q"]]), _bytes("CHOICES", [["a", "b"]])], {"threshold": 0.5}, "parameter `threshold`"),
])
def test_kserve_bad_choice_and_threshold_input(served, inputs, params, says):
    with pytest.raises(InferenceServerException) as e:
        served["triton"].infer("bert-choice", inputs(_fx("bert")), parameters=params)
    assert "INVALID_ARGUMENT" in str(e.value.status()) and says in e.value.message(), e.value.message()
    with pytest.raises(InferenceServerException) as e:
        served["triton"].infer("bert-multilabel", [_bytes("TEXT", [["q"]])], parameters={"threshold": 1.5})
    assert "within 0..=1" in e.value.message()


def test_register_task_weights_only_multilabel_with_threshold(served, native):
    pb, stub = native
    adapter = FIXTURES / "bert" / "adapters" / "multilabel"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "register_task.py"), "--addr", served["server"].admin_addr(),
                          "register", "--name", "py-multi", "--weights-only", "--adapter", str(adapter), "--backbone", "bert",
                          "--robust", "0,0,3", "--threshold", "0.9", "--set-default"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "tools")})
    assert out.returncode == 0, out.stderr
    fx = _fx("bert")
    resp = stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name="py-multi", drop_first=1)], texts=pb.Texts(texts=fx["texts"])))
    np.testing.assert_allclose([list(s.logits) for s in resp.results[0].sequences],
                               fx["tasks"]["multilabel"]["outputs"]["1"]["logits"], atol=TOL, rtol=0)
    assert all(s.threshold == pytest.approx(0.9) for s in resp.results[0].sequences)
