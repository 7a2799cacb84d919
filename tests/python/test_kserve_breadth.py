"""KServe v2 with tritonclient[grpc] on the issue-14 backbones (XLM-RoBERTa, DistilBERT, ELECTRA, and
BERT/RoBERTa from the same fixtures): the `logits` output equals the AdapterHub library's own logits
(tests/fixtures/adapterhub-breadth/<backbone>/reference.json) within 1e-4, from TEXT, TEXT + TEXT_PAIR
and input_ids, and `label` is the arg-max label. Repository: `make breadth-repo`."""
import json
from pathlib import Path

import numpy as np
import pytest


grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (make setup)")

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "adapterhub-breadth"
TOL = 1e-4


@pytest.fixture(scope="module")
def client(breadth_server):
    c = grpcclient.InferenceServerClient(breadth_server("xlm-roberta").addr)
    yield c
    c.close()


def _bytes_input(name, values):
    t = grpcclient.InferInput(name, [len(values), 1], "BYTES")
    t.set_data_from_numpy(np.array([[v.encode()] for v in values], dtype=object))
    return t


def _ids_input(inputs):
    ids = np.array(inputs["input_ids"], dtype=np.int64)
    out = []
    for name in ("input_ids", "attention_mask"):
        t = grpcclient.InferInput(name, list(ids.shape), "INT64")
        t.set_data_from_numpy(np.array(inputs[name], dtype=np.int64))
        out.append(t)
    return out


@pytest.mark.parametrize("backbone", ["xlm-roberta", "distilbert", "electra", "roberta", "bert"])
def test_kserve_logits_equal_the_library(client, backbone):
    fx = json.loads((FIXTURES / backbone / "reference.json").read_text())
    houlsby = fx["tasks"]["houlsby"]["outputs"]["0"]["logits"]  # the tasks' default drop is 0
    result = client.infer(f"{backbone}-houlsby", [_bytes_input("TEXT", fx["texts"])])
    np.testing.assert_allclose(result.as_numpy("logits"), houlsby, atol=TOL, rtol=0)
    labels = [row[0].decode() if isinstance(row, np.ndarray) else row.decode() for row in result.as_numpy("label")]
    assert labels == [f"label{i}" for i in np.argmax(houlsby, axis=1)]
    result = client.infer(f"{backbone}-pfeiffer", _ids_input(fx["inputs"]["texts"]))
    np.testing.assert_allclose(result.as_numpy("logits"), fx["tasks"]["pfeiffer"]["outputs"]["0"]["logits"],
                               atol=TOL, rtol=0)
    pairs = fx["pairs"]
    result = client.infer(f"{backbone}-pairs", [_bytes_input("TEXT", [a for a, _ in pairs]),
                                                 _bytes_input("TEXT_PAIR", [b for _, b in pairs])])
    np.testing.assert_allclose(result.as_numpy("logits"), fx["tasks"]["pfeiffer_pairs"]["outputs"]["0"]["logits"],
                               atol=TOL, rtol=0)
