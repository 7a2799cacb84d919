"""AdapterFusion: read AdapterHub fusion checkpoints, build the fusion and adapter-output graphs, and
write fusion tasks (repository format v1 with `"kind": "fusion"` slots, models/README.md).

Library math (adapters 1.3 `BertFusion` + `compose_fuse`, see adapter-math.md): for one slot with inputs
h (sub-layer output) and x (sub-layer input), the last fused adapter's pre-step gives
u = LN(h + x) (original_ln_before) else h, and residual r; each adapter j gives up_j = scaling_j * A_j(u);
Q = W_q q + b_q (q = u, or h with query_before_ln), K_j = W_k up_j + b_k, V_j = W_v up_j (no bias),
alpha = softmax_j(<Q, K_j> / T), o = sum_j alpha_j V_j + r, y = LN(o + x) (original_ln_after).
Q/K/V do not depend on the adapter count, so one fusion graph serves any subset (pruning).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from . import InvalidCheckpoint, MissingWeight, UnsupportedAdapter
from .adapterhub import Adapter, _read_json, load_tensors
from .onnx_builder import F, GraphBuilder, hidden_dims

# AdapterFusionConfig presets of the library (`adapters.configuration.adapter_fusion_config`).
PRESETS = {
    "static": dict(key=True, query=True, value=False, query_before_ln=False, regularization=False,
                   residual_before=False, temperature=False, value_before_softmax=True, value_initialized=False),
    "dynamic": dict(key=True, query=True, value=True, query_before_ln=False, regularization=True,
                    residual_before=False, temperature=False, value_before_softmax=True, value_initialized=True),
}
LOC_KEY = {"attention": "attention.output", "ffn": "output"}
SUPPORTED = ("key", "query", "value", "query_before_ln", "residual_before", "temperature", "value_before_softmax")


@dataclass
class FusionWeights:
    q_w: np.ndarray | None
    q_b: np.ndarray | None
    k_w: np.ndarray | None
    k_b: np.ndarray | None
    v_w: np.ndarray | None


@dataclass
class Fusion:
    name: str  # the library's fusion name, e.g. "fa,fb,fc"
    adapter_names: list
    config: dict  # key, query, value, query_before_ln, residual_before, value_before_softmax (bools)
    config_name: str  # dynamic | static | custom
    slots: dict = field(repr=False)  # (layer, location) -> FusionWeights
    source: str = ""


def fusion_config(cfg) -> tuple[dict, str]:
    """Normalises a saved fusion config (a preset name or the full dict) and refuses what we cannot serve."""
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise UnsupportedAdapter(f"fusion config {cfg!r} is not a known preset ({sorted(PRESETS)})")
        cfg = PRESETS[cfg]
    if not isinstance(cfg, dict):
        raise InvalidCheckpoint(f"fusion config is {cfg!r}, expected a dict or a preset name")
    missing = [k for k in SUPPORTED if k not in cfg]
    if missing:
        raise UnsupportedAdapter(f"fusion config lacks {missing}")
    if cfg["temperature"]:
        raise UnsupportedAdapter("fusion temperature=true is not supported (the library anneals T on every "
                                 "forward call, so served results would depend on call history)")
    norm = {k: bool(cfg[k]) for k in SUPPORTED if k != "temperature"}
    name = "custom"
    for preset, vals in PRESETS.items():
        if all(bool(vals[k]) == norm[k] for k in norm):
            name = preset
    return norm, name


def load_fusion(directory: str, num_layers: int, hidden: int) -> Fusion:
    meta = _read_json(os.path.join(directory, "adapter_fusion_config.json"))
    for key in ("adapter_names", "config", "name"):
        if key not in meta:
            raise InvalidCheckpoint(f"{directory}/adapter_fusion_config.json lacks {key!r}")
    cfg, cfg_name = fusion_config(meta["config"])
    if int(meta.get("hidden_size") or hidden) != hidden:
        raise InvalidCheckpoint(f"fusion hidden_size {meta['hidden_size']} != backbone hidden size {hidden}")
    names = list(meta["adapter_names"])
    if len(names) < 1 or len(set(names)) != len(names):
        raise InvalidCheckpoint(f"adapter_names {names!r} must be a non-empty list of distinct names")
    tensors, wpath = load_tensors(directory, "model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
    fname = meta["name"]
    wanted = {"query": cfg["query"], "key": cfg["key"], "value": cfg["value"]}
    slots, used = {}, set()
    for layer in range(num_layers):
        for loc, lkey in LOC_KEY.items():
            base = None
            for prefix in ("bert.", "roberta.", ""):
                cand = f"{prefix}encoder.layer.{layer}.{lkey}.adapter_fusion_layer.{fname}."
                if any(k.startswith(cand) for k in tensors):
                    base = cand
            if base is None:
                continue

            def get(part, required=True, shape=None):
                key = base + part
                if key not in tensors:
                    if required:
                        raise MissingWeight(f"key {key!r} not found in {wpath}")
                    return None
                used.add(key)
                if shape and tensors[key].shape != shape:
                    raise InvalidCheckpoint(f"{key}: shape {tensors[key].shape} != {shape}")
                return tensors[key]

            hh, h1 = (hidden, hidden), (hidden,)
            fw = FusionWeights(
                q_w=get("query.weight", shape=hh) if wanted["query"] else None,
                q_b=get("query.bias", shape=h1) if wanted["query"] else None,
                k_w=get("key.weight", shape=hh) if wanted["key"] else None,
                k_b=get("key.bias", shape=h1) if wanted["key"] else None,
                v_w=get("value.weight", shape=hh) if wanted["value"] else None)
            if wanted["value"] and (base + "value.bias") in tensors:
                raise UnsupportedAdapter(f"{base}value.bias: the library's fusion value has no bias")
            slots[(layer, loc)] = fw
    left = sorted(set(tensors) - used)
    if left:
        raise InvalidCheckpoint(f"{wpath} has weights the fusion config does not use: {left[:3]}")
    if not slots:
        raise InvalidCheckpoint(f"{wpath} has no weights for fusion {fname!r}")
    short = "/".join(os.path.normpath(os.path.abspath(directory)).split(os.sep)[-2:])
    return Fusion(fname, names, cfg, cfg_name, slots, f"{short} ({meta.get('version', '')})")


def check_compatible(fusion: Fusion, adapters: dict) -> None:
    """Every fused adapter needs a slot wherever the fusion has weights, and the same pre/post rules
    (the library takes them from the last adapter; equal rules make every subset exact)."""
    rules = {(a.original_ln_before, a.original_ln_after, a.residual_before_ln) for a in adapters.values()}
    if len(rules) != 1:
        raise UnsupportedAdapter(f"fused adapters differ in original_ln_before/after or residual_before_ln: {rules}")
    for name, a in adapters.items():
        missing = [k for k in fusion.slots if k not in a.slots]
        if missing:
            raise InvalidCheckpoint(f"adapter {name!r} has no weights at {missing[0]} where fusion {fusion.name!r} has")


# ---- graphs ---------------------------------------------------------------------------------
def _pre(g: GraphBuilder, a: Adapter, h, x, lw, lb, eps):
    """The library's pre_forward: (u, residual)."""
    s = g.op("Add", [h, x]) if (a.original_ln_before or a.residual_before_ln == "post_add") else None
    u = g.layer_norm(s, lw, lb, eps, "ln") if a.original_ln_before else h
    r = s if a.residual_before_ln == "post_add" else (h if a.residual_before_ln else u)
    return u, r


def adapter_up_graph(a: Adapter, layer: int, loc: str, lw, lb, eps: float, name: str):
    """(h, x) -> up = scaling * A(u): adapter output without its residual, as fusion consumes it."""
    sw = a.slots[(layer, loc)]
    H = a.hidden_size
    g = GraphBuilder(name)
    h, x = g.input("h", F, hidden_dims(H)), g.input("x", F, hidden_dims(H))
    g.output("up", F, hidden_dims(H))
    u, _ = _pre(g, a, h, x, lw, lb, eps)
    down = g.linear(u, sw.down_w, sw.down_b, "adapter_down")
    up = g.linear(g.activation(down, a.non_linearity), sw.up_w, sw.up_b, "adapter_up")
    if a.scaling != 1.0:
        up = g.op("Mul", [up, g.const(a.scaling, "scaling")])
    g.op("Identity", [up], "up")
    return g.model()


FORMS = ("reassociated", "library")


def fusion_graph(fusion: Fusion, rules: Adapter, fw: FusionWeights, H: int, lw, lb, eps: float, name: str,
                 form: str = "reassociated"):
    """(h [B,T,H], x [B,T,H], up [B,T,N,H]) -> (y [B,T,H], alpha [B,T,N]); N is dynamic.

    form "library" projects every adapter output with W_k and W_v, as the library does ((2N+1) H^2
    multiply-adds per token). form "reassociated" computes the same numbers with 2 H^2 per token:
    <Q, W_k up_j + b_k> = <W_k^T Q, up_j> + <Q, b_k>, and the last term is the same for every j, so
    softmax ignores it; W_k^T W_q folds into one matrix; sum_j alpha_j W_v up_j = W_v sum_j alpha_j up_j
    (the value has no bias)."""
    if form not in FORMS:
        raise ValueError(f"fusion graph form {form!r} is not one of {FORMS}")
    c = fusion.config
    g = GraphBuilder(name)
    h, x = g.input("h", F, hidden_dims(H)), g.input("x", F, hidden_dims(H))
    up = g.input("up", F, ["batch", "seq", "adapters", H])
    g.output("y", F, hidden_dims(H))
    g.output("alpha", F, ["batch", "seq", "adapters"])
    u, r = _pre(g, rules, h, x, lw, lb, eps)
    q = h if c["query_before_ln"] else u
    ax2, axm1 = g.const([2], "axis2", np.int64), g.const([-1], "axis_last", np.int64)
    if c["residual_before"]:  # the library adds r in place to the tensor used as both key and value
        up = g.op("Add", [up, g.op("Unsqueeze", [r, ax2])])
    context = _context_reassociated if form == "reassociated" else _context_library
    ctx = context(g, c, fw, q, up, ax2, axm1)  # [B,T,H]
    out = ctx if c["residual_before"] else g.op("Add", [ctx, r])
    if rules.original_ln_after:
        g.layer_norm(g.op("Add", [out, x]), lw, lb, eps, "ln", out="y")
    else:
        g.op("Identity", [out], "y")
    return g.model()


def _context_library(g: GraphBuilder, c: dict, fw: FusionWeights, q, up, ax2, axm1):
    """The library's order: K and V projected per adapter ((2N+1)H^2 per token)."""
    Q = g.linear(q, fw.q_w, fw.q_b, "query") if c["query"] else q
    K = g.linear(up, fw.k_w, fw.k_b, "key") if c["key"] else up
    V = g.linear(up, fw.v_w, None, "value") if (c["value"] and c["value_before_softmax"]) else up
    scores = g.op("Squeeze", [g.op("MatMul", [K, g.op("Unsqueeze", [Q, axm1])]), axm1])  # [B,T,N]
    alpha = g.op("Softmax", [scores], "alpha", axis=-1)
    ctx = g.op("Squeeze", [g.op("MatMul", [g.op("Unsqueeze", [alpha, ax2]), V]), ax2])
    if c["value"] and not c["value_before_softmax"]:
        ctx = g.linear(ctx, fw.v_w, None, "value")
    return ctx


def _context_reassociated(g: GraphBuilder, c: dict, fw: FusionWeights, q, up, ax2, axm1):
    """The same numbers in 2H^2 per token (see `fusion_graph`)."""
    # Qk = W_k^T Q (row form: Q @ W_k for torch-layout W_k [out, in]); b_k drops out. With a query
    # projection Q = q W_q^T + b_q, both fold into one matrix (computed in float64): one H^2 per token.
    if c["query"] and c["key"]:
        wq, wk = np.asarray(fw.q_w, np.float64), np.asarray(fw.k_w, np.float64)
        m = g.const((wq.T @ wk).astype(np.float32), "query_key.weight")
        Qk = g.op("Add", [g.op("MatMul", [q, m]), g.const((np.asarray(fw.q_b, np.float64) @ wk).astype(np.float32), "query_key.bias")])
    elif c["key"]:
        Qk = g.op("MatMul", [q, g.const(np.asarray(fw.k_w, np.float32), "key.weight")])
    else:
        Qk = g.linear(q, fw.q_w, fw.q_b, "query") if c["query"] else q
    scores = g.op("Squeeze", [g.op("MatMul", [up, g.op("Unsqueeze", [Qk, axm1])]), axm1])  # [B,T,N]
    alpha = g.op("Softmax", [scores], "alpha", axis=-1)
    ctx = g.op("Squeeze", [g.op("MatMul", [g.op("Unsqueeze", [alpha, ax2]), up]), ax2])
    if c["value"]:
        ctx = g.linear(ctx, fw.v_w, None, "value")
    return ctx
