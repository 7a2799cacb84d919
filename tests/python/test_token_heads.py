"""Tagging and extractive-QA heads (issue 14) over the wire: registered at run time with
`tools/register_task.py --weights-only` from the AdapterHub library's own files
(tests/fixtures/adapterhub-breadth), then asked through grpcio (native API) and tritonclient (KServe
v2). Numbers must equal the library's within 1e-4, character offsets the library tokenizer's, the
answer span the best one over the library's start/end logits (context tokens from the backbone's
tokenizer.json, read here with the `tokenizers` package); bad requests get INVALID_ARGUMENT naming
the field."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from adapterdrop_tools.served import Server, load_stubs  # noqa: E402

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (make setup)")
tokenizers = pytest.importorskip("tokenizers")

REPO = Path(os.environ.get("ADAPTERDROP_BREADTH_REPO", ROOT / "build" / "breadth-repo"))
FIXTURES = ROOT / "tests" / "fixtures" / "adapterhub-breadth"
BACKBONES = ("bert", "roberta")
TOL = 1e-4
DROP = 2  # every request here drops the adapters of layers 0 and 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (REPO / "backbones" / "bert" / "backbone.json").is_file():
        pytest.fail(f"{REPO} is missing; run `make breadth-repo` first", pytrace=False)
    repo = tmp_path_factory.mktemp("token-heads-repo")
    for b in BACKBONES:
        shutil.copytree(REPO / "backbones" / b, repo / "backbones" / b)
        shutil.copytree(REPO / "tasks" / f"{b}-pfeiffer", repo / "tasks" / f"{b}-pfeiffer")
    exe = next(p for p in (ROOT / "target" / "debug" / "adapterdrop-serve", ROOT / "target" / "release" / "adapterdrop-serve")
               if p.is_file())
    srv = Server(exe, repo, timeout_s=120)
    try:
        admin = srv.admin_addr()
        for b in BACKBONES:
            for head in ("tagging", "qa"):
                out = subprocess.run([sys.executable, str(ROOT / "tools" / "register_task.py"), "--addr", admin, "register",
                                      "--name", f"{b}-{head}", "--weights-only", "--adapter", str(FIXTURES / b / "adapters" / head),
                                      "--backbone", b, "--robust", f"{DROP},0,3"], capture_output=True, text=True, timeout=120)
                assert out.returncode == 0, out.stderr
        # An extractive QA task whose own default answer length is one token.
        out = subprocess.run([sys.executable, str(ROOT / "tools" / "register_task.py"), "--addr", admin, "register",
                              "--name", "bert-qa-short", "--weights-only", "--adapter", str(FIXTURES / "bert" / "adapters" / "qa"),
                              "--backbone", "bert", "--drop-first", "0", "--max-answer-length", "1"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        yield srv
    finally:
        srv.stop(20)


@pytest.fixture(scope="module")
def native(server):
    pb, pb_grpc = load_stubs()
    return pb, pb_grpc.InferenceStub(grpc.insecure_channel(server.addr))


@pytest.fixture(scope="module")
def triton(server):
    c = grpcclient.InferenceServerClient(server.addr)
    yield c
    c.close()


def fixture(b):
    return json.loads((FIXTURES / b / "reference.json").read_text())


def best_span(b, question, context, start, end, max_len=30):
    """(char start, char end) of the best span over the library's logits, from context tokens only."""
    tok = tokenizers.Tokenizer.from_file(str(FIXTURES / b / "backbone" / "tokenizer.json"))
    enc = tok.encode(question, context)
    ctx = [i for i, s in enumerate(enc.sequence_ids) if s == 1 and not enc.special_tokens_mask[i]]
    spans = sorted(((start[s] + end[e], s, e) for s in ctx for e in ctx if s <= e < s + max_len), reverse=True)
    assert spans[0][0] - spans[1][0] > 4 * TOL, "too close to call"
    return enc.offsets[spans[0][1]][0], enc.offsets[spans[0][2]][1]


@pytest.mark.parametrize("b", BACKBONES)
def test_native_tags_and_answers_like_the_library(native, b):
    pb, stub = native
    fx = fixture(b)
    ref = [pb.TaskRef(name=f"{b}-tagging"), pb.TaskRef(name=f"{b}-pfeiffer", drop_first=DROP)]
    resp = stub.Infer(pb.InferRequest(tasks=ref, texts=pb.Texts(texts=fx["texts"])))
    want = fx["tasks"]["tagging"]["outputs"][str(DROP)]["logits"]
    assert list(resp.results[0].dropped_layers) == list(range(DROP))
    for r, seq in enumerate(resp.results[0].sequences):
        n = len(seq.tokens)
        np.testing.assert_allclose(np.array(seq.logits).reshape(n, -1), np.array(want[r][:n]), atol=TOL, rtol=0)
        assert [[t.start, t.end] for t in seq.tokens] == fx["inputs"]["texts"]["offsets"][r][:n]
        words = [w for w in fx["inputs"]["texts"]["word_ids"][r][:n] if w is not None]
        assert len(seq.words) == len(set(words))
        for e in seq.entities:
            assert e.text == fx["texts"][r][e.start:e.end] and e.type in ("PER", "LOC")
    np.testing.assert_allclose([list(s.logits) for s in resp.results[1].sequences],
                               fx["tasks"]["pfeiffer"]["outputs"][str(DROP)]["logits"], atol=TOL, rtol=0)

    pairs = [pb.TextPair(text=q, text_pair=c) for q, c in fx["pairs"]]
    resp = stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name=f"{b}-qa")], pairs=pb.TextPairs(pairs=pairs), n_best=3))
    out = fx["tasks"]["qa"]["outputs"][str(DROP)]
    for r, seq in enumerate(resp.results[0].sequences):
        q, c = fx["pairs"][r]
        n = len(seq.logits) // 2
        got = np.array(seq.logits).reshape(n, 2)
        np.testing.assert_allclose(got[:, 0], out["start_logits"][r][:n], atol=TOL, rtol=0)
        np.testing.assert_allclose(got[:, 1], out["end_logits"][r][:n], atol=TOL, rtol=0)
        start, end = best_span(b, q, c, out["start_logits"][r][:n], out["end_logits"][r][:n])
        assert (seq.answers[0].start, seq.answers[0].end) == (start, end)
        assert seq.answers[0].text == c[start:end] and len(seq.answers) == 3


def bytes_input(name, values):
    t = grpcclient.InferInput(name, [len(values), 1], "BYTES")
    t.set_data_from_numpy(np.array([[v.encode()] for v in values], dtype=object))
    return t


def test_kserve_outputs_are_named_and_shaped_for_triton_users(triton):
    fx = fixture("bert")
    meta = triton.get_model_metadata("bert-tagging", as_json=True)
    shapes = {o["name"]: (o["datatype"], [int(d) for d in o["shape"]]) for o in meta["outputs"]}
    assert shapes == {"logits": ("FP32", [-1, -1, 5]), "token_labels": ("BYTES", [-1, -1]), "token_scores": ("FP32", [-1, -1]),
                      "token_offsets": ("INT64", [-1, -1, 2]), "words": ("BYTES", [-1, 1]), "entities": ("BYTES", [-1, 1])}
    r = triton.infer("bert-tagging", [bytes_input("TEXT", fx["texts"])])
    logits = r.as_numpy("logits")
    want = np.array(fx["tasks"]["tagging"]["outputs"][str(DROP)]["logits"])
    lengths = [sum(m) for m in fx["inputs"]["texts"]["attention_mask"]]
    assert logits.shape == (len(fx["texts"]), max(lengths), 5)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(logits[i, :n], want[i, :n], atol=TOL, rtol=0)
        assert (logits[i, n:] == 0).all()
        offsets = r.as_numpy("token_offsets")[i]
        special = [w is None for w in fx["inputs"]["texts"]["word_ids"][i][:n]]
        assert [list(o) for o, s in zip(offsets[:n], special) if not s] == \
            [o for o, s in zip(fx["inputs"]["texts"]["offsets"][i][:n], special) if not s]
        assert (offsets[n:] == -1).all()
        labels = [x.decode() for x in r.as_numpy("token_labels")[i][:n]]
        assert labels == [["O", "B-PER", "I-PER", "B-LOC", "I-LOC"][k] for k in np.argmax(want[i, :n], axis=1)]
        for e in json.loads(r.as_numpy("entities")[i][0]):
            assert fx["texts"][i][e["start"]:e["end"]] == e["text"]

    q, c = fx["pairs"][0]
    r = triton.infer("bert-qa", [bytes_input("TEXT", [q]), bytes_input("TEXT_PAIR", [c])], parameters={"n_best": 2})
    start, end = int(r.as_numpy("answer_start")[0][0]), int(r.as_numpy("answer_end")[0][0])
    assert r.as_numpy("answer")[0][0].decode() == c[start:end]
    assert len(json.loads(r.as_numpy("answers")[0][0])) == 2 and r.as_numpy("answer_score").shape == (1, 1)
    r = triton.infer("bert-qa", [bytes_input("TEXT", [q]), bytes_input("TEXT_PAIR", [c])], parameters={"max_answer_length": 1})
    one = r.as_numpy("answer")[0][0].decode()
    assert one and " " not in one.strip()  # one token


def test_a_tasks_own_max_answer_length_is_its_default(native):
    pb, stub = native
    fx = fixture("bert")
    pairs = pb.TextPairs(pairs=[pb.TextPair(text=q, text_pair=c) for q, c in fx["pairs"]])
    short = stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name="bert-qa-short")], pairs=pairs, n_best=5)).results[0]
    assert all(a.start_token == a.end_token for s in short.sequences for a in s.answers)
    longer = stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name="bert-qa-short")], pairs=pairs, n_best=5, max_answer_length=30))
    assert any(a.end_token > a.start_token for s in longer.results[0].sequences for a in s.answers)


def test_bad_requests_name_the_field(native, triton):
    pb, stub = native
    with pytest.raises(grpc.RpcError) as e:
        stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name="bert-qa")], texts=pb.Texts(texts=["who flew?"])))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text_pair" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        ids = pb.TokenizedInputs(sequences=[pb.TokenIds(input_ids=[2, 40, 3])])
        stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name="bert-tagging")], tokens=ids))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs.texts" in e.value.details()
    with pytest.raises(grpcclient.InferenceServerException) as e:
        triton.infer("bert-qa", [bytes_input("TEXT", ["who flew?"])])
    assert "INVALID_ARGUMENT" in str(e.value.status()) and "text_pair" in e.value.message()
    with pytest.raises(grpcclient.InferenceServerException) as e:
        triton.infer("bert-qa", [bytes_input("TEXT", ["q"]), bytes_input("TEXT_PAIR", ["c d"])], parameters={"n_best": 99})
    assert "n_best 99" in e.value.message()
