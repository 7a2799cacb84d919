"""Infer over grpcio against the real server: logits must match the numpy reference."""
import math

import numpy as np
import pytest

TOL = 1e-4
# Tasks whose every case and drop depth is checked (one per adapter method / backbone kind).
TASKS = ["sent", "topic", "score", "sent-spec", "sent-layers", "rsent", "rand-houlsby", "mini-pfeiffer"]


def _task(expected, name):
    if name not in expected["tasks"]:
        pytest.skip(f"task {name!r} is not in this test repository's expected.json")
    return expected["tasks"][name]


def _inputs(pb, case):
    if case.get("texts"):
        return {"texts": pb.Texts(texts=case["texts"])}
    if case.get("pairs"):
        return {"pairs": pb.TextPairs(pairs=[pb.TextPair(text=a, text_pair=b) for a, b in case["pairs"]])}
    seqs = [
        pb.TokenIds(input_ids=ids, attention_mask=mask, token_type_ids=types)
        for ids, mask, types in zip(case["input_ids"], case["attention_mask"], case["token_type_ids"])
    ]
    return {"tokens": pb.TokenizedInputs(sequences=seqs)}


def _default_dropped(drop):
    if "robust" in drop:
        return list(range(drop["robust"]["default"]))
    if "drop_first" in drop:
        return list(range(drop["drop_first"]))
    return sorted(drop.get("layers", []))


def _check_result(task, result, want_logits, case_name):
    want = np.asarray(want_logits, dtype=np.float64)
    assert len(result.sequences) == want.shape[0]
    for i, seq in enumerate(result.sequences):
        got = np.asarray(seq.logits, dtype=np.float64)
        assert got.shape == want[i].shape, f"{case_name}[{i}]"
        np.testing.assert_allclose(got, want[i], atol=TOL, rtol=0, err_msg=f"{case_name}[{i}]")
        if task["kind"] == "classification":
            assert len(seq.scores) == len(task["labels"])
            assert math.isclose(sum(seq.scores), 1.0, abs_tol=1e-5)
            assert all(0.0 <= s <= 1.0 for s in seq.scores)
            idx = int(np.argmax(got))
            assert seq.label_index == idx
            assert seq.label == task["labels"][idx]
        else:
            assert list(seq.scores) == []
            assert seq.label == ""


@pytest.mark.parametrize("name", TASKS)
def test_infer_matches_reference_at_every_depth(stub, pb, expected, name):
    task = _task(expected, name)
    robust = "robust" in task["drop"]
    for case in task["cases"]:
        inputs = _inputs(pb, case)
        # Default drop config (no drop_first).
        resp = stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name=name)], **inputs), timeout=30)
        (result,) = resp.results
        assert result.task == name and result.version == task["version"]
        assert list(result.dropped_layers) == _default_dropped(task["drop"])
        assert list(resp.num_tokens) == [len(ids) for ids in case["input_ids"]]
        _check_result(task, result, case["default_logits"], f"{name}/{case['name']}/default")
        if not robust:
            continue
        # Every explicit depth the reference has.
        for n, logits in sorted(case["logits"].items(), key=lambda kv: int(kv[0])):
            ref = pb.TaskRef(name=name, drop_first=int(n))
            resp = stub.Infer(pb.InferRequest(tasks=[ref], **inputs), timeout=30)
            (result,) = resp.results
            assert list(result.dropped_layers) == list(range(int(n)))
            _check_result(task, result, logits, f"{name}/{case['name']}/drop_first={n}")


def test_multi_task_request_matches_single_task_references(stub, pb, expected):
    sent, topic = _task(expected, "sent"), _task(expected, "topic")
    case = next(c for c in sent["cases"] if c.get("texts"))
    topic_case = next(c for c in topic["cases"] if c["name"] == case["name"])
    req = pb.InferRequest(
        tasks=[pb.TaskRef(name="topic", drop_first=1), pb.TaskRef(name="sent", drop_first=2)],
        texts=pb.Texts(texts=case["texts"]),
    )
    resp = stub.Infer(req, timeout=30)
    assert [r.task for r in resp.results] == ["topic", "sent"]
    _check_result(topic, resp.results[0], topic_case["logits"]["1"], "multi/topic")
    _check_result(sent, resp.results[1], case["logits"]["2"], "multi/sent")
    assert resp.timings.total_us > 0 and resp.timings.batch_rows >= len(case["texts"])


def test_emoji_and_non_latin_texts(stub, pb, expected):
    task = _task(expected, "sent")
    texts = ["Привет, мир", "你好，世界", "مرحبا بالعالم", "🎬🍿🔥", "naïve café — «ok»"]
    resp = stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name="sent")], texts=pb.Texts(texts=texts)), timeout=30)
    (result,) = resp.results
    assert len(result.sequences) == len(texts)
    assert len(resp.num_tokens) == len(texts) and all(n >= 3 for n in resp.num_tokens)
    for seq in result.sequences:
        assert all(math.isfinite(x) for x in seq.logits)
        assert math.isclose(sum(seq.scores), 1.0, abs_tol=1e-5)
        assert seq.label in task["labels"]
    # The emoji text of the reference cases gives the reference logits even when sent alone.
    case = next(c for c in task["cases"] if c.get("texts"))
    i = next(i for i, t in enumerate(case["texts"]) if "🎬" in t)
    resp = stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name="sent")], texts=pb.Texts(texts=[case["texts"][i]])), timeout=30)
    np.testing.assert_allclose(resp.results[0].sequences[0].logits, case["default_logits"][i], atol=TOL, rtol=0)
