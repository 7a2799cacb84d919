"""KServe v2 (Open Inference Protocol) with Triton's own Python client, tritonclient[grpc].

Ground truth is the native adapterdrop.v1.Inference API on the same server: every number the
KServe endpoint returns must equal what the native API returns for the same input (1e-5).
"""
import asyncio
import queue

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (make setup)")
aioclient = pytest.importorskip("tritonclient.grpc.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.addr)
    yield c
    c.close()


def _case(expected, task, name):
    return next(c for c in expected["tasks"][task]["cases"] if c["name"] == name)


def _text_inputs(texts, pairs=None):
    t = grpcclient.InferInput("TEXT", [len(texts), 1], "BYTES")
    t.set_data_from_numpy(np.array([[s.encode()] for s in texts], dtype=object))
    if pairs is None:
        return [t]
    p = grpcclient.InferInput("TEXT_PAIR", [len(pairs), 1], "BYTES")
    p.set_data_from_numpy(np.array([[s.encode()] for s in pairs], dtype=object))
    return [t, p]


def _padded(case):
    """input_ids/attention_mask/token_type_ids of a reference case as [N, L] arrays (right-padded)."""
    n, width = len(case["input_ids"]), max(len(r) for r in case["input_ids"])
    ids, mask, types = (np.zeros((n, width), dtype=np.int64) for _ in range(3))
    for i, (r, t) in enumerate(zip(case["input_ids"], case["token_type_ids"])):
        ids[i, : len(r)], mask[i, : len(r)], types[i, : len(r)] = r, 1, t
    return ids, mask, types


def _id_inputs(ids, mask, types):
    out = []
    for name, arr in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", types)):
        t = grpcclient.InferInput(name, list(arr.shape), "INT64")
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def _native(stub, pb, tasks, **inputs):
    refs = [pb.TaskRef(name=n, drop_first=d) if d is not None else pb.TaskRef(name=n) for n, d in tasks]
    return stub.Infer(pb.InferRequest(tasks=refs, **inputs), timeout=30).results


def _assert_same(result, native_task, prefix=""):
    logits = np.array([s.logits for s in native_task.sequences], dtype=np.float32)
    np.testing.assert_allclose(result.as_numpy(f"{prefix}logits"), logits, atol=TOL, rtol=0)
    if native_task.sequences[0].scores:
        scores = np.array([s.scores for s in native_task.sequences], dtype=np.float32)
        np.testing.assert_allclose(result.as_numpy(f"{prefix}probabilities"), scores, atol=TOL, rtol=0)
        labels = [row[0].decode() for row in result.as_numpy(f"{prefix}label")]
        assert labels == [s.label for s in native_task.sequences]
    dropped = result.get_response().parameters[f"{prefix}dropped_layers"].string_param
    assert dropped == ",".join(str(v) for v in native_task.dropped_layers)


def test_server_and_model_metadata(client, expected):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "adapterdrop-serve" and "statistics" in meta.extensions
    assert client.is_model_ready("sent") and client.is_model_ready("sent", "1")
    assert not client.is_model_ready("sent", "9") and not client.is_model_ready("no-such-task")
    m = client.get_model_metadata("topic")
    assert m.name == "topic" and list(m.versions) == ["1"] and m.platform == "adapterdrop"
    assert [(i.name, i.datatype, list(i.shape)) for i in m.inputs] == [
        ("TEXT", "BYTES", [-1, 1]),
        ("TEXT_PAIR", "BYTES", [-1, 1]),
        ("input_ids", "INT64", [-1, -1]),
        ("attention_mask", "INT64", [-1, -1]),
        ("token_type_ids", "INT64", [-1, -1]),
    ]
    width = len(expected["tasks"]["topic"]["labels"])
    assert [(o.name, o.datatype, list(o.shape)) for o in m.outputs] == [
        ("logits", "FP32", [-1, width]),
        ("probabilities", "FP32", [-1, width]),
        ("label", "BYTES", [-1, 1]),
    ]
    # Regression heads have logits only; a backbone without tokenizer takes ids only.
    assert [o.name for o in client.get_model_metadata("score").outputs] == ["logits"]
    assert [i.name for i in client.get_model_metadata("rsent").inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    cfg = client.get_model_config("sent").config
    assert cfg.name == "sent" and cfg.max_batch_size > 0 and all(i.optional for i in cfg.input)
    assert cfg.parameters["labels"].string_value == ",".join(expected["tasks"]["sent"]["labels"])
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no-such-task")
    assert "NOT_FOUND" in err.value.status()


@pytest.mark.parametrize("task", ["sent", "topic", "score"])
def test_bytes_texts_and_pairs_equal_native(client, stub, pb, expected, task):
    texts = _case(expected, task, "texts")["texts"]
    result = client.infer(task, _text_inputs(texts), request_id="r1")
    assert result.get_response().id == "r1" and result.get_response().model_version == "1"
    (native,) = _native(stub, pb, [(task, None)], texts=pb.Texts(texts=texts))
    _assert_same(result, native)
    # The numbers are the reference's too.
    np.testing.assert_allclose(result.as_numpy("logits"), _case(expected, task, "texts")["default_logits"], atol=1e-4, rtol=0)

    pairs = _case(expected, task, "pairs")["pairs"]
    result = client.infer(task, _text_inputs([a for a, _ in pairs], [b for _, b in pairs]))
    (native,) = _native(stub, pb, [(task, None)], pairs=pb.TextPairs(pairs=[pb.TextPair(text=a, text_pair=b) for a, b in pairs]))
    _assert_same(result, native)


@pytest.mark.parametrize("task,case", [("rsent", "ids"), ("sent", "pairs")])
def test_int64_token_inputs_equal_native(client, stub, pb, expected, task, case):
    c = _case(expected, task, case)
    ids, mask, types = _padded(c)
    result = client.infer(task, _id_inputs(ids, mask, types))
    seqs = [pb.TokenIds(input_ids=i, attention_mask=m, token_type_ids=t) for i, m, t in zip(ids.tolist(), mask.tolist(), types.tolist())]
    (native,) = _native(stub, pb, [(task, None)], tokens=pb.TokenizedInputs(sequences=seqs))
    _assert_same(result, native)
    np.testing.assert_allclose(result.as_numpy("logits"), c["default_logits"], atol=1e-4, rtol=0)
    # Only the outputs asked for, in the order asked.
    only = client.infer(task, _id_inputs(ids, mask, types), outputs=[grpcclient.InferRequestedOutput("label"), grpcclient.InferRequestedOutput("logits")])
    assert [o.name for o in only.get_response().outputs] == ["label", "logits"]


def test_drop_override_and_fan_out_equal_native(client, stub, pb, expected):
    texts = _case(expected, "sent", "texts")["texts"]
    result = client.infer("sent", _text_inputs(texts), parameters={"drop_first": 2, "tasks": "topic:1,score"})
    native = _native(stub, pb, [("sent", 2), ("topic", 1), ("score", None)], texts=pb.Texts(texts=texts))
    _assert_same(result, native[0])
    _assert_same(result, native[1], "topic/")
    _assert_same(result, native[2], "score/")
    assert result.get_response().parameters["dropped_layers"].string_param == "0,1"
    names = [o.name for o in result.get_response().outputs]
    assert names == ["logits", "probabilities", "label", "topic/logits", "topic/probabilities", "topic/label", "score/logits"]
    np.testing.assert_allclose(result.as_numpy("logits"), _case(expected, "sent", "texts")["logits"]["2"], atol=1e-4, rtol=0)


def test_async_infer_with_callback(client, stub, pb, expected):
    texts = _case(expected, "topic", "texts")["texts"]
    done: "queue.Queue" = queue.Queue()
    for i in range(4):
        client.async_infer("topic", _text_inputs(texts[i:i + 1]), lambda result, error: done.put((result, error)), request_id=str(i))
    results = {}
    for _ in range(4):
        result, error = done.get(timeout=30)
        assert error is None, error
        results[result.get_response().id] = result
    (native,) = _native(stub, pb, [("topic", None)], texts=pb.Texts(texts=texts[:4]))
    for i in range(4):
        got = results[str(i)].as_numpy("logits")[0]
        np.testing.assert_allclose(got, native.sequences[i].logits, atol=TOL, rtol=0)


def test_asyncio_client(server, stub, pb, expected):
    texts = _case(expected, "sent", "texts")["texts"]

    async def run():
        async with aioclient.InferenceServerClient(server.addr) as c:
            assert await c.is_model_ready("sent")
            inputs = []
            for t in texts:
                x = aioclient.InferInput("TEXT", [1, 1], "BYTES")
                x.set_data_from_numpy(np.array([[t.encode()]], dtype=object))
                inputs.append([x])
            return await asyncio.gather(*(c.infer("sent", i) for i in inputs))

    results = asyncio.run(run())
    (native,) = _native(stub, pb, [("sent", None)], texts=pb.Texts(texts=texts))
    for r, seq in zip(results, native.sequences):
        np.testing.assert_allclose(r.as_numpy("logits")[0], seq.logits, atol=TOL, rtol=0)


def test_streaming_infer_answers_each_request_and_survives_a_bad_one(server, stub, pb, expected):
    texts = _case(expected, "sent", "texts")["texts"]
    answers: "queue.Queue" = queue.Queue()
    c = grpcclient.InferenceServerClient(server.addr)
    try:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i, t in enumerate(texts):
            c.async_stream_infer("sent", _text_inputs([t]), request_id=f"s{i}", parameters={"drop_first": 1})
        c.async_stream_infer("no-such-task", _text_inputs(["x"]), request_id="bad")
        c.async_stream_infer("sent", _text_inputs([texts[0]]), request_id="after")
        got, errors = {}, []
        for _ in range(len(texts) + 2):
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result
    finally:
        c.stop_stream()
        c.close()
    assert len(errors) == 1 and "no-such-task" in errors[0].message()
    (native,) = _native(stub, pb, [("sent", 1)], texts=pb.Texts(texts=texts))
    for i, seq in enumerate(native.sequences):
        np.testing.assert_allclose(got[f"s{i}"].as_numpy("logits")[0], seq.logits, atol=TOL, rtol=0)
    assert "after" in got


def test_statistics_count_both_apis(client, stub, pb):
    def stats():
        (s,) = client.get_inference_statistics("sent-spec", "1").model_stats
        return s

    before = stats()
    client.infer("sent-spec", _text_inputs(["one", "two", "three"]))
    _native(stub, pb, [("sent-spec", None)], texts=pb.Texts(texts=["four", "five"]))
    with pytest.raises(InferenceServerException):
        client.infer("sent-spec", _text_inputs(["fine", "  "]))  # refused after the task resolved
    after = stats()
    assert after.inference_count - before.inference_count == 5
    assert after.inference_stats.success.count - before.inference_stats.success.count == 2
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.execution_count - before.execution_count in (1, 2)
    for field in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(after.inference_stats, field).count - getattr(before.inference_stats, field).count == 2
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert after.last_inference > 0 and after.batch_stats
    everything = client.get_inference_statistics().model_stats
    assert {"sent", "topic", "sent-spec"} <= {s.name for s in everything}


def test_repository_index_and_load_unload(client, expected):
    index = client.get_model_repository_index().models
    assert {(m.name, m.version, m.state) for m in index} >= {(n, "1", "READY") for n in expected["tasks"]}
    assert len(client.get_model_repository_index().models) == len(index)
    client.load_model("sent")  # already ready: a no-op that succeeds
    assert client.is_model_ready("sent")
    with pytest.raises(InferenceServerException) as err:
        client.unload_model("sent")
    assert "UNIMPLEMENTED" in err.value.status() and "admin service" in err.value.message()
    assert client.is_model_ready("sent")
    with pytest.raises(InferenceServerException) as err:
        client.load_model("no-such-task")
    assert "NOT_FOUND" in err.value.status() and "not in the model repository" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.unload_model("no-such-task")
    assert "NOT_FOUND" in err.value.status()
