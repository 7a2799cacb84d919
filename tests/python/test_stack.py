"""Issue 14 item 4 on the wire: `tools/register_task.py register --weights-only --adapter TASK --stack LANG`
registers the library's Stack(lang, stack) (MAD-X, the language adapter's invertible adapter included, on
ELECTRA before embeddings_project) on a running server; grpcio (native, every drop depth, beside a plain task in one request) and tritonclient
(KServe, fan-out) get the library's logits within 1e-4. Repository: a copy of `make breadth-repo`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest


grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (make setup)")

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "adapterhub-breadth"
TOL = 1e-4


@pytest.mark.parametrize("b", ["bert", "electra"])  # ELECTRA: the invertible adapter before embeddings_project
def test_register_task_stack_served_like_the_library(b, breadth_server, pb, pb_grpc):
    served = breadth_server(b, (f"{b}-pfeiffer",))
    adapters = FIXTURES / b / "adapters"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "register_task.py"), "--addr", served.admin_addr(),
                          "register", "--name", "py-stack", "--weights-only", "--adapter", str(adapters / "stack"),
                          "--stack", str(adapters / "lang"), "--backbone", b, "--robust", "0,0,3"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "tools")})
    assert out.returncode == 0, out.stderr
    fx = json.loads((FIXTURES / b / "reference.json").read_text())
    want = fx["tasks"]["stack"]["outputs"]
    with grpc.insecure_channel(served.addr) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for n in range(4):
            resp = stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name="py-stack", drop_first=n)],
                                              texts=pb.Texts(texts=fx["texts"])))
            np.testing.assert_allclose([list(s.logits) for s in resp.results[0].sequences], want[str(n)]["logits"],
                                       atol=TOL, rtol=0, err_msg=f"n={n}")
        resp = stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name="py-stack", drop_first=2), pb.TaskRef(name=f"{b}-pfeiffer")],
                                          texts=pb.Texts(texts=fx["texts"])))
        np.testing.assert_allclose([list(s.logits) for s in resp.results[0].sequences], want["2"]["logits"], atol=TOL, rtol=0)
        # The exported Pfeiffer task at its default depth (robust, default 0) in the same request.
        np.testing.assert_allclose([list(s.logits) for s in resp.results[1].sequences],
                                   fx["tasks"]["pfeiffer"]["outputs"]["0"]["logits"], atol=TOL, rtol=0)
    c = grpcclient.InferenceServerClient(served.addr)
    try:
        arr = np.array([[t.encode()] for t in fx["texts"]], dtype=object)
        text = grpcclient.InferInput("TEXT", list(arr.shape), "BYTES")
        text.set_data_from_numpy(arr)
        r = c.infer("py-stack", [text], parameters={"drop_first": 1})
        np.testing.assert_allclose(r.as_numpy("logits"), want["1"]["logits"], atol=TOL, rtol=0)
    finally:
        c.close()
