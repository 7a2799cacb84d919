"""Issue 14 backbones: XLM-RoBERTa, DistilBERT and ELECTRA checkpoints (and BERT/RoBERTa) saved by the
library (tests/fixtures/adapterhub-breadth) read by the exporter, computed by the numpy reference and by
the exported ONNX graphs exactly like the library; anything else refused naming the architecture."""
import json
import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest

import export_backbone
from adapterdrop_tools import InvalidCheckpoint, UnsupportedAdapter
from adapterdrop_tools.adapterhub import load_adapter, load_head
from adapterdrop_tools.checkpoint import load_checkpoint
from adapterdrop_tools.reference import Reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BREADTH = os.path.join(ROOT, "tests", "fixtures", "adapterhub-breadth")
BACKBONES = ["bert", "roberta", "xlm-roberta", "distilbert", "electra"]
TOL = 1e-5


def reference(b):
    with open(os.path.join(BREADTH, b, "reference.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("b", BACKBONES)
def test_numpy_reference_matches_library(b):
    ck = load_checkpoint(os.path.join(BREADTH, b, "backbone"))
    assert ck.architecture == b
    fx = reference(b)
    ref = Reference(ck)
    t = fx["inputs"]["texts"]
    hid = ref.encode(t["input_ids"], t["attention_mask"], t.get("token_type_ids"))
    assert np.abs(hid[:, 0] - np.array(fx["embedding"]["cls"])).max() < TOL
    for task in ("pfeiffer", "houlsby", "pfeiffer_pairs"):
        spec = fx["tasks"][task]
        adir = os.path.join(BREADTH, b, "adapters", task)
        adapter, head = load_adapter(adir, ck.num_layers, ck.hidden_size), load_head(adir, ck.hidden_size)
        x = fx["inputs"][spec["inputs"]]
        for n in range(ck.num_layers + 1):
            got = ref.logits(x["input_ids"], x["attention_mask"], x.get("token_type_ids"), adapter, head, range(n))
            want = np.array(spec["outputs"][str(n)]["logits"])
            assert np.abs(got - want).max() < TOL, (b, task, n)


@pytest.mark.parametrize("b", ["xlm-roberta", "distilbert", "electra"])
def test_exported_backbone_graphs_match_library_embedding(b, tmp_path):
    """embeddings.onnx + every layer's segments and plain slots = the library's plain last hidden state."""
    repo = str(tmp_path / "repo")
    assert export_backbone.main(["--checkpoint", os.path.join(BREADTH, b, "backbone"), "--out", repo, "--name", b]) == 0
    bdir = os.path.join(repo, "backbones", b)
    manifest = json.load(open(os.path.join(bdir, "backbone.json")))
    assert manifest["architecture"] == b and manifest["tokenizer"] == "tokenizer.json"
    fx = reference(b)
    t = fx["inputs"]["texts"]
    ids = np.array(t["input_ids"], np.int64)
    mask = np.array(t["attention_mask"], np.int64)
    tt = np.array(t.get("token_type_ids", np.zeros_like(ids)), np.int64)

    def run(path, **feeds):
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    x = run(os.path.join(bdir, "embeddings.onnx"), input_ids=ids, token_type_ids=tt)
    for i in range(manifest["num_layers"]):
        ld = os.path.join(bdir, "layers", str(i))
        x1 = run(os.path.join(ld, "attention_slot.onnx"), h=run(os.path.join(ld, "attention.onnx"), hidden=x,
                                                               attention_mask=mask), x=x)
        x = run(os.path.join(ld, "ffn_slot.onnx"), h=run(os.path.join(ld, "ffn.onnx"), hidden=x1), x=x1)
    assert np.abs(x[:, 0] - np.array(fx["embedding"]["cls"])).max() < 1e-4
    m = mask[:, :, None]
    mean = (x * m).sum(1) / m.sum(1)
    assert np.abs(mean - np.array(fx["embedding"]["mean"])).max() < 1e-4


def test_distilbert_adapter_keys_are_read():
    """DistilBERT saves adapters under transformer.layer.{i}.(attention|output)_adapters."""
    a = load_adapter(os.path.join(BREADTH, "distilbert", "adapters", "houlsby"), 3, 32)
    assert sorted(a.slots) == [(i, loc) for i in range(3) for loc in ("attention", "ffn")]


def unknown_checkpoint(tmp_path, **config):
    d = tmp_path / "ck"
    shutil.copytree(os.path.join(BREADTH, "bert", "backbone"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(config)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_unknown_architecture_is_refused_by_name(tmp_path, capsys):
    ck = unknown_checkpoint(tmp_path, model_type="gpt2", architectures=["GPT2Model"])
    with pytest.raises(InvalidCheckpoint, match=r"model_type 'gpt2' is not a supported architecture; supported: "
                                                 r"bert, roberta, xlm-roberta, distilbert, electra"):
        load_checkpoint(ck)
    out = str(tmp_path / "repo")
    assert export_backbone.main(["--checkpoint", ck, "--out", out, "--name", "g"]) == 2
    assert "'gpt2'" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "backbones", "g"))


def test_architectures_field_alone_names_the_model(tmp_path):
    ck = unknown_checkpoint(tmp_path, model_type="", architectures=["ElectraModel"])
    assert load_checkpoint(ck).architecture == "electra"
    ck2 = unknown_checkpoint(tmp_path / "x", model_type="", architectures=["MPNetModel"])
    with pytest.raises(InvalidCheckpoint, match=r"architectures \['MPNetModel'\] is not a supported architecture"):
        load_checkpoint(ck2)


@pytest.mark.parametrize("task,message", [
    ("lora", r"adapter method LoRA \(lora\) \(architecture='lora'\) is not exported to slot graphs: register the "
             r"AdapterHub directory weights-only"),
    ("ia3", r"adapter method \(IA\)\^3 \(ia3\) \(architecture='lora'\) is not exported to slot graphs"),
    ("par_bn", r"parallel bottleneck adapters \(par_bn, is_parallel=true\) are not exported to slot graphs: "
               r"register the AdapterHub directory weights-only"),
    ("lang", r"inv_adapter='nice' \(invertible adapters\) is not supported"),
])
def test_unsupported_methods_saved_by_the_library_are_named(task, message):
    """What the library saved for LoRA, (IA)^3, par_bn and a MAD-X language adapter is refused by method,
    saying where the first three are served instead."""
    with pytest.raises(UnsupportedAdapter, match=message):
        load_adapter(os.path.join(BREADTH, "bert", "adapters", task), 3, 32)


@pytest.mark.parametrize("task,kind", [("tagging", "tagging"), ("qa", "question_answering")])
def test_unsupported_heads_saved_by_the_library_are_named(task, kind):
    with pytest.raises(UnsupportedAdapter, match=f"head_type='{kind}' is not supported"):
        load_head(os.path.join(BREADTH, "bert", "adapters", task), 32)


def test_multilabel_and_multiple_choice_heads_are_the_classification_layers():
    """The library's multi-label and multiple-choice heads load as the two-layer head: a logit per
    label, and one logit per (context, choice) pair without labels."""
    multi = load_head(os.path.join(BREADTH, "bert", "adapters", "multilabel"), 32)
    assert (multi.kind, multi.labels, multi.w2.shape) == ("multilabel", ["topic0", "topic1", "topic2", "topic3"], (4, 32))
    choice = load_head(os.path.join(BREADTH, "bert", "adapters", "choice"), 32)
    assert (choice.kind, choice.labels, choice.w2.shape) == ("multiple_choice", [], (1, 32))
