"""The exported repository follows models/README.md: manifests, graph contracts, opset/IR."""
import json
import os

import onnx
import pytest
from onnx import TensorProto

from adapterdrop_tools.testrepo import load_expected

BACKBONE_KEYS = ["format_version", "name", "architecture", "num_layers", "hidden_size", "num_heads",
                 "intermediate_size", "vocab_size", "type_vocab_size", "max_positions", "pad_token_id",
                 "layer_norm_eps", "tokenizer", "slots", "source", "license", "embedding"]
F, I64 = TensorProto.FLOAT, TensorProto.INT64


def io(model):
    def desc(v):
        t = v.type.tensor_type
        return v.name, t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]
    return [desc(v) for v in model.graph.input], [desc(v) for v in model.graph.output]


def check_graph(path, inputs, outputs):
    m = onnx.load(path)
    assert m.ir_version == 10
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    got_in, got_out = io(m)
    assert got_in == inputs, path
    assert got_out == outputs, path


def test_backbone_manifests_and_graphs(test_repo):
    for name in ("bert-tiny", "roberta-tiny", "tiny-random"):
        d = os.path.join(test_repo, "backbones", name)
        with open(os.path.join(d, "backbone.json")) as f:
            bb = json.load(f)
        assert list(bb) == BACKBONE_KEYS + ["capturable_layer"]  # the test repository exports both layer graphs
        assert bb["format_version"] == 1 and bb["name"] == name and bb["slots"] == ["attention", "ffn"]
        assert isinstance(bb["source"], str) and isinstance(bb["license"], str)  # the server wants strings
        assert bb["embedding"] == {"pooling": "mean", "normalize": False}  # no sentence-transformers config
        H = bb["hidden_size"]
        hid = ["batch", "seq", H]
        assert (bb["tokenizer"] is not None) == os.path.isfile(os.path.join(d, "tokenizer.json"))
        check_graph(os.path.join(d, "embeddings.onnx"),
                    [("input_ids", I64, ["batch", "seq"]), ("token_type_ids", I64, ["batch", "seq"])],
                    [("hidden", F, hid)])
        for i in range(bb["num_layers"]):
            ld = os.path.join(d, "layers", str(i))
            check_graph(os.path.join(ld, "attention.onnx"),
                        [("hidden", F, hid), ("attention_mask", I64, ["batch", "seq"])], [("h", F, hid)])
            check_graph(os.path.join(ld, "ffn.onnx"), [("hidden", F, hid)], [("h", F, hid)])
            for s in ("attention_slot", "ffn_slot"):
                check_graph(os.path.join(ld, f"{s}.onnx"), [("h", F, hid), ("x", F, hid)], [("y", F, hid)])
            # the graph without control flow has layer.onnx's inputs and outputs
            check_graph(os.path.join(ld, bb["capturable_layer"]), *io(onnx.load(os.path.join(ld, "layer.onnx"))))
    with open(os.path.join(test_repo, "backbones", "roberta-tiny", "backbone.json")) as f:
        rb = json.load(f)
    assert rb["architecture"] == "roberta" and rb["max_positions"] == 66 - 1 - 1 and rb["tokenizer"] is None
    assert rb["pad_token_id"] == 1 and rb["type_vocab_size"] == 1


def test_task_manifests_and_graphs(test_repo):
    exp = load_expected(test_repo)
    for task, t in exp["tasks"].items():
        d = os.path.join(test_repo, "tasks", task, "1")
        with open(os.path.join(d, "task.json")) as f:
            m = json.load(f)
        assert m["format_version"] == 1 and m["name"] == task and m["version"] == 1
        assert m["backbone"] == t["backbone"] and m["drop"] == t["drop"]
        assert m["adapter"]["method"] in ("seq_bn", "double_seq_bn", "fusion")
        assert len([k for k in ("drop_first", "layers", "robust") if k in m["drop"]]) == 1
        H = 32
        hid = ["batch", "seq", H]
        for s in m["slots"]:
            assert s["location"] in ("attention", "ffn") and 0 <= s["layer"] < t["num_layers"]
            if s.get("kind") == "fusion":  # models/README.md, "Fusion tasks"
                assert m["adapter"]["method"] == "fusion" and s["adapters"]
                check_graph(os.path.join(d, s["graph"]), [("h", F, hid), ("x", F, hid), ("up", F, ["batch", "seq", "adapters", H])],
                            [("y", F, hid), ("alpha", F, ["batch", "seq", "adapters"])])
                for a in s["adapters"]:
                    check_graph(os.path.join(d, a["graph"]), [("h", F, hid), ("x", F, hid)], [("up", F, hid)])
                continue
            assert s["graph"] == f"slots/layer{s['layer']}_{s['location']}.onnx"
            if "up" in s:
                check_graph(os.path.join(d, s["up"]), [("h", F, hid), ("x", F, hid)], [("up", F, hid)])
            check_graph(os.path.join(d, s["graph"]), [("h", F, hid), ("x", F, hid)], [("y", F, hid)])
        width = 1 if m["head"]["type"] == "regression" else len(m["head"]["labels"])
        check_graph(os.path.join(d, m["head"]["graph"]), [("hidden", F, hid)], [("logits", F, ["batch", width])])
        layers = {s["layer"] for s in m["slots"]}
        if "drop_first" in m["drop"]:
            assert layers == set(range(m["drop"]["drop_first"], t["num_layers"]))
        elif "layers" in m["drop"]:
            assert layers == set(range(t["num_layers"])) - set(m["drop"]["layers"])
        else:
            assert layers == set(range(m["drop"]["robust"]["min"], t["num_layers"]))
    assert exp["tasks"]["score"]["kind"] == "regression" and exp["tasks"]["score"]["labels"] == []
    assert exp["tasks"]["topic"]["labels"] == ["business", "sport", "tech"]


def test_no_temp_dirs_left(test_repo):
    for sub in ("backbones", "tasks"):
        assert not [n for n in os.listdir(os.path.join(test_repo, sub)) if n.startswith(".")]


def test_rebuild_is_idempotent(test_repo, tmp_path):
    from adapterdrop_tools.testrepo import build
    out = str(tmp_path / "r")
    build(out)
    first = open(os.path.join(out, "expected.json")).read()
    build(out)
    assert open(os.path.join(out, "expected.json")).read() == first
    assert first == open(os.path.join(test_repo, "expected.json")).read()
    with open(os.path.join(out, "tasks", "topic", "1", "slots", "layer0_attention.onnx"), "rb") as a, \
            open(os.path.join(test_repo, "tasks", "topic", "1", "slots", "layer0_attention.onnx"), "rb") as b:
        assert a.read() == b.read()


def test_tokenizer_reproduces_expected_ids(test_repo):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(os.path.join(test_repo, "backbones", "bert-tiny", "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    for case in load_expected(test_repo)["tasks"]["sent"]["cases"]:
        if case["texts"]:
            encs = [tok.encode(t) for t in case["texts"]]
        else:
            encs = [tok.encode(a, b) for a, b in case["pairs"]]
        assert [e.ids for e in encs] == case["input_ids"]
        assert [e.type_ids for e in encs] == case["token_type_ids"]


def test_tasks_carry_their_adapterhub_files_verbatim(test_repo):
    """Every single-adapter task holds the AdapterHub files it was exported from (task.json
    "adapterhub"), byte for byte; fusion tasks do not (they keep the per-task path)."""
    from adapterdrop_tools.adapterhub import ADAPTERHUB_FILES
    from adapterdrop_tools.testrepo import task_specs
    sources = {task: adir for task, _, adir, _ in task_specs(os.path.join(test_repo, "sources"), False)}
    expected = load_expected(test_repo)
    for task in expected["tasks"]:
        d = os.path.join(test_repo, "tasks", task, "1")
        with open(os.path.join(d, "task.json")) as f:
            m = json.load(f)
        if "fusion" in expected["tasks"][task]:
            assert "adapterhub" not in m and not os.path.exists(os.path.join(d, "adapterhub")), task
            continue
        assert m["adapterhub"] == "adapterhub", task
        assert sorted(os.listdir(os.path.join(d, "adapterhub"))) == sorted(ADAPTERHUB_FILES), task
        if task in sources:
            for name in ADAPTERHUB_FILES:
                with open(os.path.join(sources[task], name), "rb") as a, open(os.path.join(d, "adapterhub", name), "rb") as b:
                    assert a.read() == b.read(), (task, name)


def test_a_torch_pickle_is_copied_as_safetensors(test_repo, tmp_path, monkeypatch):
    """An adapter read from pytorch_adapter.bin lands in the bundle as adapter.safetensors with the
    same keys and values (torch itself is replaced by a reader of the same tensors: the venv has no torch)."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file

    from adapterdrop_tools import adapterhub
    src = os.path.join(test_repo, "sources", "tiny-random", "adapters", "rand-pfeiffer")
    pickled = tmp_path / "src"
    shutil.copytree(src, pickled)
    original = load_file(str(pickled / "adapter.safetensors"))
    os.rename(pickled / "adapter.safetensors", pickled / "pytorch_adapter.bin")
    monkeypatch.setattr(adapterhub, "_read_bin", lambda path, st_name="": dict(original))
    a = adapterhub.load_adapter(str(pickled), 3, 32)
    assert a.weights_file.endswith("pytorch_adapter.bin")
    adapterhub.copy_adapterhub(a, adapterhub.load_head(str(pickled), 32), str(tmp_path / "out"))
    got = load_file(str(tmp_path / "out" / "adapter.safetensors"))
    assert sorted(got) == sorted(original)
    assert all(np.array_equal(got[k], original[k]) for k in original)
