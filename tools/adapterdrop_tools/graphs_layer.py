"""One graph per backbone layer with adapter banks as inputs (issue 12, models/README.md "Layer graphs").

`layers/<i>/layer.onnx` runs attention, the attention slot, the FFN and the FFN slot of layer i for
every row of a batch, whatever adapters the rows use: each slot gathers its adapter's weights from a
bank (stacked weights of every loaded task, row 0 = "no adapter") by a per-row index, and the rule
(LayerNorm placement, residual, activation, scaling) is data too, one flag row per bank row. Rows
split where tasks' paths differ: `attention_rows` / `ffn_rows` say which row each slot's output row
continues (AdapterDrop's shared lower layers: fewer rows below the first adapter).

Selection uses `Where` on the 0/1 flags, so the chosen branch is taken bit for bit; bank row 0 gives
`LN(h + x)`, the plain slot, exactly."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .checkpoint import Checkpoint
from .graphs_backbone import attention_body, ffn_body
from .graphs_methods import any_method, gather_methods, if_methods, method_inputs, method_projection, parallel_input
from .onnx_builder import F, I64, GraphBuilder

LOCATIONS = ("attention", "ffn")
# Column order of a bank's `rule` row ([N, 1, K]); the server writes the same layout.
RULE_COLUMNS = ("ln_before", "ln_after", "residual_h", "residual_u", "residual_s", "scale",
                "relu", "silu", "gelu", "tanh", "sigmoid", "parallel")
K = len(RULE_COLUMNS)
COL = {name: i for i, name in enumerate(RULE_COLUMNS)}
ACTIVATIONS = RULE_COLUMNS[6:11]
BANK_TENSORS = ("down_w", "down_b", "up_w", "up_b", "rule")


def layer_graph(ck: Checkpoint, i: int):
    """(hidden, attention_mask, row maps, bank indices, banks) -> y; see the module doc."""
    H = ck.hidden_size
    g = GraphBuilder(f"layer{i}")
    hidden = g.input("hidden", F, ["rows0", "seq", H])
    mask = g.input("attention_mask", I64, ["rows0", "seq"])
    rows = {}
    for loc, n in (("attention", "rows1"), ("ffn", "rows2")):
        rows[loc] = (g.input(f"{loc}_rows", I64, [n]), g.input(f"{loc}_index", I64, [n]))
    banks = {loc: bank_inputs(g, loc, H) for loc in LOCATIONS}
    methods_index, methods = method_inputs(g, H, ck.intermediate_size)
    g.output("y", F, ["rows2", "seq", H])
    # LoRA / (IA)^3 (graphs_methods.py), only when a row uses them: per entering row, then per row
    # after the attention split.
    used = any_method(g, methods_index)

    def attention_methods(b):
        w = gather_methods(b, methods, ("query", "key", "value"), methods_index)
        return attention_body(b, ck, i, hidden, mask, hook=lambda t, x, y: method_projection(b, x, y, w[t]))

    def ffn_methods(b):
        index = b.op("Gather", [methods_index, rows["attention"][0]], axis=0)
        w = gather_methods(b, methods, ("intermediate", "output"), index)
        return ffn_body(b, ck, i, x1, hook=lambda t, x, y: method_projection(b, x, y, w[t]))

    h1 = if_methods(g, used, attention_methods, lambda b: attention_body(b, ck, i, hidden, mask), "attention")
    x1 = bank_slot(g, h1, hidden, *rows["attention"], banks["attention"], *ck.ln(i, "attention"), ck.eps, "attention")
    h2 = if_methods(g, used, ffn_methods, lambda b: ffn_body(b, ck, i, x1), "ffn")
    bank_slot(g, h2, x1, *rows["ffn"], banks["ffn"], *ck.ln(i, "ffn"), ck.eps, "ffn", out="y")
    return g.model()


def bank_inputs(g: GraphBuilder, loc: str, H: int) -> dict:
    n, r = f"{loc}_bank_rows", f"{loc}_bank_width"
    dims = {"down_w": [n, H, r], "down_b": [n, 1, r], "up_w": [n, r, H], "up_b": [n, 1, H], "rule": [n, 1, K]}
    return {t: g.input(f"{loc}.{t}", F, dims[t]) for t in BANK_TENSORS}


def bank_slot(g: GraphBuilder, h: str, x: str, rows: str, index: str, bank: dict, lw, lb, eps: float, loc: str,
              out: str | None = None) -> str:
    """The general AdapterHub slot rule (graphs_task.adapter_slot_graph) with per-row weights and flags."""
    h = g.op("Gather", [h, rows], axis=0)
    x = g.op("Gather", [x, rows], axis=0)
    w = {t: g.op("Gather", [bank[t], index], axis=0) for t in BANK_TENSORS}  # [R, ...]
    axis2 = g.const([2], "rule_axis", np.int64)

    def flag(name: str) -> str:  # [R, 1, 1]
        k = COL[name]
        return g.op("Slice", [w["rule"], g.const([k], f"rule_{k}", np.int64), g.const([k + 1], f"rule_{k + 1}", np.int64), axis2])

    def on(name: str) -> str:
        return g.op("Cast", [flag(name)], to=TensorProto.BOOL)

    s = g.op("Add", [h, x])
    u = g.op("Where", [on("ln_before"), g.layer_norm(s, lw, lb, eps, f"{loc}.ln"), h])
    u = parallel_input(g, on("parallel"), x, u)  # par_bn: the adapter reads the sub-layer input
    pre = g.op("Add", [g.op("MatMul", [u, w["down_w"]]), w["down_b"]])
    z = g.activation(pre, "sigmoid")
    for act in ("tanh", "gelu", "silu", "relu"):
        z = g.op("Where", [on(act), g.activation(pre, act), z])
    up = g.op("Mul", [g.op("Add", [g.op("MatMul", [z, w["up_w"]]), w["up_b"]]), flag("scale")])
    r = g.op("Where", [on("residual_h"), h, g.op("Where", [on("residual_u"), u, s])])
    o = g.op("Add", [up, r])
    return g.op("Where", [on("ln_after"), g.layer_norm(g.op("Add", [o, x]), lw, lb, eps, f"{loc}.ln"), o], out)


# ---- bank rows (for tests and tools; the server builds its banks in Rust the same way) ----------
def rule_row(adapter) -> np.ndarray:
    """One bank's rule row for an AdapterHub `Adapter` (adapterhub.py)."""
    row = np.zeros(K, np.float32)
    row[COL["ln_before"]] = float(adapter.original_ln_before)
    row[COL["ln_after"]] = float(adapter.original_ln_after)
    res = adapter.residual_before_ln
    row[COL["residual_s" if res == "post_add" else ("residual_h" if res else "residual_u")]] = 1.0
    row[COL["scale"]] = adapter.scaling
    row[COL[adapter.non_linearity]] = 1.0
    row[COL["parallel"]] = float(getattr(adapter, "is_parallel", False))
    return row


def plain_rule_row() -> np.ndarray:
    """Row 0, "no adapter": zero weights, scale 0, residual h, LayerNorm after: y = LN(h + x)."""
    row = np.zeros(K, np.float32)
    row[COL["ln_before"]] = row[COL["ln_after"]] = row[COL["residual_h"]] = row[COL["relu"]] = 1.0
    return row


def bank(entries: list, H: int) -> dict:
    """Stack `entries` (each `(adapter, slot_weights)`, or None for "no adapter") into one bank, padded
    with zeros to the widest bottleneck; row 0 is always "no adapter"."""
    entries = [None] + list(entries)
    r = max([1] + [sw.down_w.shape[0] for e in entries if e is not None for sw in [e[1]]])
    n = len(entries)
    out = {"down_w": np.zeros((n, H, r), np.float32), "down_b": np.zeros((n, 1, r), np.float32),
           "up_w": np.zeros((n, r, H), np.float32), "up_b": np.zeros((n, 1, H), np.float32),
           "rule": np.zeros((n, 1, K), np.float32)}
    for j, e in enumerate(entries):
        if e is None:
            out["rule"][j, 0] = plain_rule_row()
            continue
        adapter, sw = e
        d = sw.down_w.shape[0]
        out["down_w"][j, :, :d] = sw.down_w.T
        out["down_b"][j, 0, :d] = sw.down_b
        out["up_w"][j, :d, :] = sw.up_w.T
        out["up_b"][j, 0] = sw.up_b
        out["rule"][j, 0] = rule_row(adapter)
    return out
