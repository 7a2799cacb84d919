"""layer.onnx with the methods of issue 14 (graphs_methods.py) against the AdapterHub library's own
outputs (tests/fixtures/adapterhub-breadth): par_bn rows in the bottleneck bank, LoRA and (IA)^3 rows in
the methods bank, every backbone, every drop depth, within 1e-4; the banks' row 0 stays the plain layer."""
import json
import os
import re

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file

from adapterdrop_tools.adapterhub import Adapter, SlotWeights, load_head
from adapterdrop_tools.checkpoint import load_checkpoint
from adapterdrop_tools.graphs_backbone import embeddings_graph
from adapterdrop_tools.graphs_layer import attention_maps, bank, layer_graph, methods_maps, no_stack_rows, pack_maps
from adapterdrop_tools.graphs_methods import methods_bank
from adapterdrop_tools.reference import head_logits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BREADTH = os.path.join(ROOT, "tests", "fixtures", "adapterhub-breadth")
BACKBONES = ["bert", "roberta", "xlm-roberta", "distilbert", "electra"]
TOL = 1e-4
MODULES = {"query": "query", "q_lin": "query", "key": "key", "k_lin": "key", "value": "value", "v_lin": "value",
           "intermediate.dense": "intermediate", "ffn.lin1": "intermediate", "output.dense": "output",
           "ffn.lin2": "output"}
LORA_KEY = re.compile(r"layer\.(\d+)\.(?:attention\.self\.|attention\.)?(query|key|value|q_lin|k_lin|v_lin|"
                      r"intermediate\.dense|output\.dense|ffn\.lin1|ffn\.lin2)\.loras\.[^.]+\.lora_([AB])$")


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def lora_entries(adir, layers):
    """Per layer, the methods-bank entry of a LoRA / (IA)^3 directory (scaling folded in)."""
    cfg = json.load(open(os.path.join(adir, "adapter_config.json")))["config"]
    scaling = cfg["alpha"] / cfg["r"]
    out = [{} for _ in range(layers)]
    for key, w in load_file(os.path.join(adir, "adapter.safetensors")).items():
        layer, module, which = LORA_KEY.search(key).groups()
        t = out[int(layer)].setdefault(MODULES[module], {})
        if cfg["composition_mode"] == "scale":
            t["scale"] = w[:, 0] * scaling
        elif which == "A":
            t["lora_a"] = w.T
        else:
            t["lora_b"] = w.T * scaling
    return out


def par_bn_adapter(adir, layers, H):
    meta = json.load(open(os.path.join(adir, "adapter_config.json")))
    w = load_file(os.path.join(adir, "adapter.safetensors"))
    slots = {}
    for i in range(layers):
        p = next(k for k in w if f"layer.{i}." in k and k.endswith("adapter_down.0.weight"))[:-len("adapter_down.0.weight")]
        slots[(i, "ffn")] = SlotWeights(w[p + "adapter_down.0.weight"], w[p + "adapter_down.0.bias"],
                                        w[p + "adapter_up.weight"], w[p + "adapter_up.bias"])
    c = meta["config"]
    return Adapter(name=meta["name"], method="par_bn", hidden_size=H, non_linearity=c["non_linearity"],
                   non_linearity_name=c["non_linearity"], reduction_factor=c["reduction_factor"],
                   original_ln_before=False, original_ln_after=c["original_ln_after"], residual_before_ln=True,
                   scaling=c["scaling"], leave_out=[], locations=("ffn",), slots=slots, is_parallel=True)


@pytest.mark.parametrize("b", BACKBONES)
def test_methods_in_the_layer_graph_match_the_library(b):
    ck = load_checkpoint(os.path.join(BREADTH, b, "backbone"))
    fx = json.load(open(os.path.join(BREADTH, b, "reference.json")))
    H, L, ffn = ck.hidden_size, ck.num_layers, ck.intermediate_size
    emb, layers = session(embeddings_graph(ck)), [session(layer_graph(ck, i)) for i in range(L)]
    x = fx["inputs"]["texts"]
    ids, mask = np.array(x["input_ids"], np.int64), np.array(x["attention_mask"], np.int64)
    tt = np.array(x.get("token_type_ids", np.zeros_like(ids)), np.int64)
    lens = [int(m.sum()) for m in mask]
    rows = list(range(len(ids)))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    par = par_bn_adapter(os.path.join(BREADTH, b, "adapters", "par_bn"), L, H)
    entries = {t: lora_entries(os.path.join(BREADTH, b, "adapters", t), L) for t in ("lora", "ia3")}
    for task in ("par_bn", "lora", "ia3"):
        head = load_head(os.path.join(BREADTH, b, "adapters", task), H)
        for n in range(L + 1):
            e = emb.run(["hidden"], {"input_ids": ids, "token_type_ids": tt})[0]
            h = np.concatenate([e[j, :k] for j, k in enumerate(lens)])  # packed tokens
            for i in range(L):
                on = [int(i >= n)] * len(rows)
                off = [0] * len(rows)
                feeds = {"hidden": h, **attention_maps(lens, mask)}
                feeds.update({f"attention_{k}": v for k, v in pack_maps(lens, rows, off).items()})
                feeds.update({f"ffn_{k}": v for k, v in pack_maps(lens, rows, on if task == "par_bn" else off).items()})
                # LoRA is row 1 of the methods bank, (IA)^3 row 2
                m = {"lora": 1, "ia3": 2}.get(task, 0)
                feeds.update(methods_maps(lens, [m * k for k in on], rows))
                feeds.update({f"attention.{k}": v for k, v in bank([], H).items()})
                feeds.update({f"ffn.{k}": v for k, v in bank([(par, par.slots[(i, "ffn")])], H).items()})
                feeds.update(methods_bank([entries[t][i] for t in ("lora", "ia3")], H, ffn))
                feeds.update(no_stack_rows(feeds, H))
                h = layers[i].run(["y"], feeds)[0]
            h = h[starts][:, None, :]  # each row's first token
            got = head_logits(h.astype(np.float64), head)
            want = np.array(fx["tasks"][task]["outputs"][str(n)]["logits"])
            assert np.abs(got - want).max() < TOL, (b, task, n, np.abs(got - want).max())
