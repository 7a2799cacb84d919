"""The one-group slot (issue 12, "gap"; graphs_layer.bank_slot, models/README.md "Layer graphs").

Most slots a batch meets take one bank row for every token: one task's rows, plain rows, every
layer AdapterDrop drops for the whole batch, the attention slot of Pfeiffer tasks (beside any other
tasks). There the general slot's machinery (grouping and ungrouping `Gather`s, the stack step's
check, the rule's dispatch ops and `If`s: dozens of small nodes) is pure overhead. So each slot of
`layer.onnx` is an `If` on `one_group`: the slot on the packed tokens as they are (`fast_slot`), else
the grouped slot. Both compute the same ops on the same values: the same bits
(tools/tests/test_layer_graph.py).

Only the slots branch: attention and the FFN (with their methods `If`) stay in the main graph, because
ONNX Runtime runs the layer's products measurably slower (and not to the same bits) two `If`s deep
(docs/benchmarks.md, "One task vs the fused graph").

A slot qualifies when:
- its maps are one group (`index` [1]) of every entering token once, in order: `group` [1, N] and
  `ungroup` [N] for the N tokens of `x` (no row splits there). Shapes decide this: the host packs a
  group's tokens in entering order (graphs_layer.pack_maps, src/engine/packing.rs), so a single group
  of every token once is the identity (src/engine/banked.rs tests it);
- its bank row is the plain rule (`scale` 0, residual `h`, LayerNorm after: `LN(h + x)`) or
  Pfeiffer's (LayerNorm before, relu, sequential, residual `h`, LayerNorm after, any scale), and its
  stack row is inactive (no activation flag). Flags are matched as exactly 1 (or 0); a row with other
  values still gets its exact result from the grouped slot."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .graphs_methods import if_branches
from .graphs_rule import ACTIVATIONS, COL, K
from .onnx_builder import GraphBuilder

# Rule patterns the one-group slot runs: {column: value}; other columns are not read by that form.
PLAIN = {"scale": 0.0, "residual_h": 1.0, "ln_after": 1.0}
PFEIFFER = {"ln_before": 1.0, "parallel": 0.0, "relu": 1.0, "residual_h": 1.0, "ln_after": 1.0}


def _pattern(pattern: dict, stack_free: bool) -> tuple:
    """(mask, value) rows of `2K` columns (the rule row, then the stack row) for `pattern`."""
    mask, value = np.zeros(2 * K, np.float32), np.zeros(2 * K, np.float32)
    for name, v in pattern.items():
        mask[COL[name]], value[COL[name]] = 1.0, v
    if stack_free:  # the stack row's activation flags all 0: no lower adapter
        for name in ACTIVATIONS:
            mask[K + COL[name]] = 1.0
    return mask, value


def slot_kinds(g: GraphBuilder, groups, bank: dict, stack: dict) -> tuple:
    """(whether every group of the slot has the plain or the Pfeiffer rule with no stack row, whether
    the plain one): bool scalars, any group count."""
    rows = g.op("Concat", [groups.weights(g, bank["rule"]), groups.weights(g, stack["rule"])], axis=2)  # [G, 1, 2K]
    (pm, pv), (fm, fv) = _pattern(PLAIN, True), _pattern(PFEIFFER, True)
    masked = g.op("Mul", [rows, g.const(np.stack([pm, fm]), "fast_rule_mask")])  # [G, 2, 2K]
    same = g.op("Cast", [g.op("Equal", [masked, g.const(np.stack([pv, fv]), "fast_rule_value")])], to=TensorProto.FLOAT)
    kinds = g.op("ReduceMin", [same], axes=[0, 2], keepdims=0)  # [plain, Pfeiffer]: 1 / 0
    half = g.const(0.5, "rule_half")
    plain = g.op("Greater", [g.op("Gather", [kinds, g.const(0, "fast_plain_at", np.int64)], axis=0), half])
    return g.op("Greater", [g.op("ReduceMax", [kinds], keepdims=0), half]), plain


def one_group(g: GraphBuilder, x: str, groups, bank: dict, stack: dict) -> tuple:
    """(whether the slot takes the one-group form, whether its row is plain): bool scalars (module doc)."""
    i64 = lambda v, name: g.const(v, name, np.int64)  # noqa: E731
    n = g.op("Shape", [x], start=0, end=1)
    got = g.op("Concat", [g.op("Shape", [groups.group]), g.op("Shape", [groups.ungroup])], axis=0)  # [G, S, N']
    want = g.op("Add", [g.op("Mul", [n, i64([0, 1, 1], "fast_n_at")]), i64([1, 0, 0], "fast_one_at")])  # [1, N, N]
    shaped = g.op("Equal", [g.op("ReduceMax", [g.op("Abs", [g.op("Sub", [got, want])])], keepdims=0), i64(0, "fast_zero")])
    known, plain = slot_kinds(g, groups, bank, stack)
    return g.op("And", [shaped, known]), plain


def fast_slot(g: GraphBuilder, h: str, x: str, groups, bank: dict, lw, lb, eps: float, loc: str, plain: str) -> str:
    """One slot on packed `[N, H]` tokens, one bank row: `LN(h + x)` where the row is plain, else
    Pfeiffer's `LN(scale (relu(LN(h + x) W_down + b_down) W_up + b_up) + h + x)` (graphs_rule.py's
    branches, in their order of operations; the last ones on `[N, H]`, so the branch writes its output in place)."""
    ln_name = f"{loc}.ln"

    def pfeiffer(b):  # the bottleneck's products batched over the one group ([1, N, r]) as in the general form
        s = b.op("Add", [h, x])
        w = {t: groups.weights(b, bank[t]) for t in ("down_w", "down_b", "up_w", "up_b", "rule")}
        down = b.op("Add", [b.op("MatMul", [b.layer_norm(s, lw, lb, eps, ln_name), w["down_w"]]), w["down_b"]])
        scale = b.op("Slice", [w["rule"], *(b.const([c], f"rule_{c}", np.int64) for c in (COL["scale"], COL["scale"] + 1)),
                               b.const([2], "rule_axis", np.int64)])
        up = b.op("Mul", [b.op("Add", [b.op("MatMul", [b.op("Relu", [down]), w["up_w"]]), w["up_b"]]), scale])
        up = b.op("Reshape", [up, b.const([-1, groups.width], f"groups_flat_{groups.width}", np.int64)])  # [N, H]
        return b.layer_norm(b.op("Add", [b.op("Add", [up, h]), x]), lw, lb, eps, ln_name)

    return if_branches(g, plain, lambda b: b.layer_norm(b.op("Add", [h, x]), lw, lb, eps, ln_name), pfeiffer,
                       f"{loc}_fast", ("plain", "pfeiffer"))
