"""Issue 14 item 4 (Stack, MAD-X): the numpy reference of `Stack("lang", "stack")` with the
language adapter's invertible adapter ("nice") at the embeddings equals the adapters library's own
outputs (tests/fixtures/adapterhub-breadth) at every drop depth, on all five backbones; so do the
layer graphs' stack bank and, on ELECTRA, the exported embeddings split around `embeddings_project`.
This pins down the math the server reproduces (tests/stack_exactness.rs): the invertible adapter
stays active at every depth (it is not a layer), and each stacked adapter feeds its output, before
the LayerNorm, to the next."""
import json
import os
import sys

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file

from adapterdrop_tools.adapterhub import Adapter, SlotWeights, load_head
from adapterdrop_tools.checkpoint import load_checkpoint
from adapterdrop_tools.graphs_layer import attention_maps, bank, layer_graph, methods_maps, pack_maps, stack_bank
from adapterdrop_tools.graphs_methods import methods_bank
from adapterdrop_tools.reference import Reference, head_logits, linear, nice, stack_slot

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import export_backbone  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BREADTH = os.path.join(ROOT, "tests", "fixtures", "adapterhub-breadth")


def pfeiffer(adir: str, layers: int, H: int) -> tuple[Adapter, dict]:
    """The FFN adapters of a Pfeiffer directory (also one with an invertible adapter) and its
    invertible adapter's weights (empty if none)."""
    meta = json.load(open(os.path.join(adir, "adapter_config.json")))
    w = {k: np.float64(v) for k, v in load_file(os.path.join(adir, "adapter.safetensors")).items()}
    slots = {}
    for i in range(layers):
        p = next(k for k in w if f"layer.{i}." in k and k.endswith("adapter_down.0.weight"))[:-len("adapter_down.0.weight")]
        slots[(i, "ffn")] = SlotWeights(w[p + "adapter_down.0.weight"], w[p + "adapter_down.0.bias"],
                                        w[p + "adapter_up.weight"], w[p + "adapter_up.bias"])
    c = meta["config"]
    inv = {k.split("invertible_adapters.")[1].split(".", 1)[1]: v for k, v in w.items() if "invertible_adapters." in k}
    return Adapter(name=meta["name"], method="seq_bn", hidden_size=H, non_linearity=c["non_linearity"],
                   non_linearity_name=c["non_linearity"], reduction_factor=c["reduction_factor"],
                   original_ln_before=c["original_ln_before"], original_ln_after=c["original_ln_after"],
                   residual_before_ln=c["residual_before_ln"], scaling=c["scaling"], leave_out=[],
                   locations=("ffn",), slots=slots), inv


@pytest.mark.parametrize("b", ["bert", "roberta", "xlm-roberta", "distilbert", "electra"])
def test_stack_reference_matches_the_library(b):
    ck = load_checkpoint(os.path.join(BREADTH, b, "backbone"))
    fx = json.load(open(os.path.join(BREADTH, b, "reference.json")))
    spec = fx["tasks"]["stack"]
    assert spec["adapters"] == ["lang", "stack"]
    ref = Reference(ck)
    # ELECTRA: the invertible adapter sits between the embeddings' LayerNorm and `embeddings_project`.
    project = None
    if "embeddings_project.weight" in ref.w:
        project = [ref.w.pop(f"embeddings_project.{k}") for k in ("weight", "bias")]
    lang, inv = pfeiffer(os.path.join(BREADTH, b, "adapters", "lang"), ck.num_layers, ck.hidden_size)
    task, _ = pfeiffer(os.path.join(BREADTH, b, "adapters", "stack"), ck.num_layers, ck.hidden_size)
    assert inv, "the language adapter has an invertible adapter"
    head = load_head(os.path.join(BREADTH, b, "adapters", "stack"), ck.hidden_size)
    x = fx["inputs"][spec["inputs"]]
    ids, mask = np.array(x["input_ids"]), np.array(x["attention_mask"])
    tt = np.array(x.get("token_type_ids", np.zeros_like(ids)))
    for n in range(ck.num_layers + 1):
        h = nice(ref.embeddings(ids, tt), inv, lang.non_linearity)  # at every depth
        if project:
            h = linear(h, *project)
        for i in range(ck.num_layers):
            if i < n:
                h = ref.layer(i, h, mask)
                continue
            x1 = ref.slot(i, "attention", ref.attention(i, h, mask), h)
            h = stack_slot(ref, i, "ffn", ref.ffn(i, x1), x1, [lang, task])
        got = head_logits(h, head)
        assert np.abs(got - np.array(spec["outputs"][str(n)]["logits"])).max() < 1e-5, (b, n)


@pytest.mark.parametrize("b", ["bert", "roberta", "xlm-roberta", "distilbert", "electra"])
def test_stack_bank_in_the_layer_graph_matches_the_library(b):
    """layer.onnx with the language adapter in the `<loc>.stack` bank and the task adapter in the
    main bank = the library's `Stack("lang", "stack")` at every drop depth, within 1e-4; in the same
    batch, rows of a plain Pfeiffer task (no stack row: the step passes them through) = the library's
    `pfeiffer` outputs. The embeddings (and the invertible adapter, which is not a layer) come from
    the numpy reference here: this checks the layer graph's stack bank."""
    ck = load_checkpoint(os.path.join(BREADTH, b, "backbone"))
    fx = json.load(open(os.path.join(BREADTH, b, "reference.json")))
    H, L = ck.hidden_size, ck.num_layers
    layers = [ort.InferenceSession(layer_graph(ck, i).SerializeToString(), providers=["CPUExecutionProvider"])
              for i in range(L)]
    ref = Reference(ck)
    project = None
    if "embeddings_project.weight" in ref.w:
        project = [ref.w.pop(f"embeddings_project.{k}") for k in ("weight", "bias")]
    ad = os.path.join(BREADTH, b, "adapters")
    lang, inv = pfeiffer(os.path.join(ad, "lang"), L, H)
    task, _ = pfeiffer(os.path.join(ad, "stack"), L, H)
    plain, _ = pfeiffer(os.path.join(ad, "pfeiffer"), L, H)
    x = fx["inputs"]["texts"]
    ids, mask = np.array(x["input_ids"]), np.array(x["attention_mask"], np.int64)
    tt = np.array(x.get("token_type_ids", np.zeros_like(ids)))
    e = ref.embeddings(ids, tt)
    stacked = nice(e, inv, lang.non_linearity)
    if project:
        e, stacked = linear(e, *project), linear(stacked, *project)
    B = len(ids)
    lens = [int(m.sum()) for m in mask] * 2  # rows 0..B-1: the stack task; B..2B-1: pfeiffer
    both = np.concatenate([stacked, e]).astype(np.float32)
    rows = list(range(2 * B))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    for n in range(L + 1):
        h = np.concatenate([both[j, :k] for j, k in enumerate(lens)])
        for i in range(L):
            idx = [1] * B + [2] * B if i >= n else [0] * (2 * B)
            feeds = {"hidden": h, **attention_maps(lens, np.concatenate([mask, mask]))}
            feeds.update({f"attention_{k}": v for k, v in pack_maps(lens, rows, [0] * (2 * B)).items()})
            feeds.update({f"ffn_{k}": v for k, v in pack_maps(lens, rows, idx).items()})
            feeds.update(methods_maps(lens, [0] * (2 * B), rows))
            feeds.update(methods_bank([], H, ck.intermediate_size))
            feeds.update({f"attention.{k}": v for k, v in bank([], H).items()})
            feeds.update({f"attention.stack.{k}": v for k, v in stack_bank([], H).items()})
            ffn = [(a, a.slots[(i, "ffn")]) for a in (task, plain)]
            feeds.update({f"ffn.{k}": v for k, v in bank(ffn, H).items()})
            feeds.update({f"ffn.stack.{k}": v for k, v in stack_bank([(lang, lang.slots[(i, "ffn")]), None], H).items()})
            h = layers[i].run(["y"], feeds)[0]
        first = h[starts][:, None, :].astype(np.float64)
        for name, got in (("stack", head_logits(first[:B], load_head(os.path.join(ad, "stack"), H))),
                          ("pfeiffer", head_logits(first[B:], load_head(os.path.join(ad, "pfeiffer"), H)))):
            want = np.array(fx["tasks"][name]["outputs"][str(n)]["logits"])
            assert np.abs(got - want).max() < 1e-4, (b, name, n, np.abs(got - want).max())


@pytest.mark.parametrize("b", ["electra", "bert"])
def test_exported_embeddings_split_for_the_invertible_adapter(b, tmp_path):
    """ELECTRA (embedding_size 16 != hidden 32): `embeddings.onnx` also outputs `embedded`, the states
    before `embeddings_project`, and `embeddings_project.onnx` maps them to `hidden`: on the plain
    states bit for bit the graph's own `hidden` (whatever rows it is given), on nice(embedded) the
    library's stacked embeddings. A backbone without a projection exports neither."""
    repo = str(tmp_path / "repo")
    assert export_backbone.main(["--checkpoint", os.path.join(BREADTH, b, "backbone"), "--out", repo, "--name", b]) == 0
    bdir = os.path.join(repo, "backbones", b)
    manifest = json.load(open(os.path.join(bdir, "backbone.json")))
    emb = ort.InferenceSession(os.path.join(bdir, "embeddings.onnx"), providers=["CPUExecutionProvider"])
    project_path = os.path.join(bdir, "embeddings_project.onnx")
    if b != "electra":
        assert "embedding_size" not in manifest and not os.path.exists(project_path)
        assert [o.name for o in emb.get_outputs()] == ["hidden"]
        return
    assert manifest["embedding_size"] == 16 and manifest["hidden_size"] == 32
    assert [o.name for o in emb.get_outputs()] == ["hidden", "embedded"]
    project = ort.InferenceSession(project_path, providers=["CPUExecutionProvider"])
    fx = json.load(open(os.path.join(BREADTH, b, "reference.json")))
    x = fx["inputs"]["texts"]
    ids, tt = np.array(x["input_ids"], np.int64), np.array(x["token_type_ids"], np.int64)
    hidden, embedded = emb.run(["hidden", "embedded"], {"input_ids": ids, "token_type_ids": tt})
    for rows in ([0, 1, 2, 3], [2], [3, 0, 0, 1]):
        np.testing.assert_array_equal(project.run(["hidden"], {"embedded": embedded[rows]})[0], hidden[rows])
    ref = Reference(load_checkpoint(os.path.join(BREADTH, b, "backbone")))
    proj = [ref.w.pop(f"embeddings_project.{k}") for k in ("weight", "bias")]
    assert np.abs(embedded - ref.embeddings(ids, tt)).max() < 1e-5
    lang, inv = pfeiffer(os.path.join(BREADTH, b, "adapters", "lang"), 3, 32)
    stacked = nice(np.float64(embedded), inv, lang.non_linearity).astype(np.float32)
    got = project.run(["hidden"], {"embedded": stacked})[0]
    assert np.abs(got - linear(nice(ref.embeddings(ids, tt), inv, lang.non_linearity), *proj)).max() < 1e-5
