"""The layer graph's one-group path (issue 12, "gap"; graphs_layer.py, models/README.md "Layer graphs").

Most batches a layer sees take one bank row per slot for every token: one task's rows, plain rows,
and every layer AdapterDrop drops for the whole batch. For them the general layer graph's machinery
(token grouping and ungrouping `Gather`s, attention's gather and scatter, the rule's dispatch ops and
`If`s, the methods and stack checks: about 90 small nodes) costs ~4% of a BERT-base layer at T = 16
(docs/benchmarks.md, "One task vs the fused graph"). So `layer.onnx` decides once per run: when the
batch qualifies (`fast_condition`) it runs `fast_layer`, the plain layer plus the slot on the packed
tokens as they are, else the general graph. Both compute the same ops on the same values: the same
bits (tools/tests/test_layer_graph.py).

A batch qualifies when, at this layer:
- no row has a LoRA / (IA)^3 row (`methods_index` all 0);
- each slot's maps are one group (`index` [1]) of every entering token once, in order: `group`
  [1, N] and `ungroup` [N] for N entering tokens (no row splits here). Shapes decide this: the host
  packs a group's tokens in entering order (graphs_layer.pack_maps, src/engine/packing.rs), so a
  single group of every token once is the identity;
- attention is unpadded: `attention_gather` [B, T] with B * T = N and `attention_scatter` [N]
  (likewise the identity: rows packed in order, so a reshape);
- each slot's bank row is the plain rule (`scale` 0, residual `h`, LayerNorm after: `LN(h + x)`)
  or Pfeiffer's (LayerNorm before, relu, sequential, residual `h`, LayerNorm after, any scale), and
  its stack row is inactive (no activation flag). Flags are matched as exactly 1 (or 0); a row with
  other values still gets its exact result from the general graph."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .graphs_backbone import attention_body, ffn_body
from .graphs_methods import if_branches
from .graphs_rule import ACTIVATIONS, COL, K
from .onnx_builder import GraphBuilder

# Rule patterns the one-group path runs: {column: value}; other columns are not read by that form.
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


def slot_kinds(g: GraphBuilder, groups, bank: dict, stack: dict) -> str:
    """`[2]` float: whether every group of the slot has the plain rule, and the Pfeiffer rule, with
    no stack row (1 / 0; any group count)."""
    rows = g.op("Concat", [groups.weights(g, bank["rule"]), groups.weights(g, stack["rule"])], axis=2)  # [G, 1, 2K]
    (pm, pv), (fm, fv) = _pattern(PLAIN, True), _pattern(PFEIFFER, True)
    masked = g.op("Mul", [rows, g.const(np.stack([pm, fm]), "fast_rule_mask")])  # [G, 2, 2K]
    same = g.op("Cast", [g.op("Equal", [masked, g.const(np.stack([pv, fv]), "fast_rule_value")])], to=TensorProto.FLOAT)
    return g.op("ReduceMin", [same], axes=[0, 2], keepdims=0)


def fast_condition(g: GraphBuilder, hidden: str, gather: str, scatter: str, maps: dict, banks: dict, stacks: dict,
                   methods_used: str) -> tuple:
    """(whether the batch takes the one-group path: bool scalar, `[2]` bool: whether each slot
    (attention, FFN) is plain rather than Pfeiffer there); see the module doc."""
    i64 = lambda v, name: g.const(v, name, np.int64)  # noqa: E731
    # [G_a, S_a, G_f, S_f, N_a, N_f, scatter's N, N, B * T] must be [1, N, 1, N, N, N, N, N, N].
    n = g.op("Shape", [hidden], start=0, end=1)
    shapes = g.op("Concat", [g.op("Shape", [maps["attention"].group]), g.op("Shape", [maps["ffn"].group]),
                             g.op("Shape", [maps["attention"].ungroup]), g.op("Shape", [maps["ffn"].ungroup]),
                             g.op("Shape", [scatter]), n,
                             g.op("Reshape", [g.op("Size", [gather]), i64([1], "fast_one_dim")])], axis=0)
    want = g.op("Add", [g.op("Mul", [n, i64([0, 1, 0, 1, 1, 1, 1, 1, 1], "fast_n_at")]),
                        i64([1, 0, 1, 0, 0, 0, 0, 0, 0], "fast_one_at")])
    shaped = g.op("Equal", [g.op("ReduceMax", [g.op("Abs", [g.op("Sub", [shapes, want])])], keepdims=0), i64(0, "fast_zero")])
    kinds = {loc: slot_kinds(g, maps[loc], banks[loc], stacks[loc]) for loc in ("attention", "ffn")}
    both = g.op("Concat", [kinds["attention"], kinds["ffn"]], axis=0)  # [a_plain, a_pf, f_plain, f_pf]
    known = g.op("ReduceMin", [g.op("ReduceMax", [g.op("Reshape", [both, i64([2, 2], "fast_kinds")])], axes=[1], keepdims=0)],
                 keepdims=0)
    ok = g.op("And", [g.op("And", [shaped, g.op("Not", [methods_used])]), g.op("Greater", [known, g.const(0.5, "rule_half")])])
    plain = g.op("Greater", [g.op("Gather", [both, i64([0, 2], "fast_plain_at")], axis=0), g.const(0.5, "rule_half")])
    return ok, plain  # plain: [2] bool, attention and FFN


def fast_layer(g: GraphBuilder, ck, i: int, hidden: str, mask: str, gather: str, maps: dict, banks: dict, plain: str,
               eps: float) -> str:
    """The layer on the packed tokens as they are (the batch passed `fast_condition`): attention
    reshaped to `attention_gather`'s [B, T] rows, each slot `LN(h + x)` or Pfeiffer's rule on its
    one bank row, with the general graph's ops."""
    h1 = attention_body(g, ck, i, hidden, mask, gather=gather, in_order=True)
    x1 = fast_slot(g, h1, hidden, maps["attention"], banks["attention"], *ck.ln(i, "attention"), eps, "attention", plain, 0)
    h2 = ffn_body(g, ck, i, x1)
    return fast_slot(g, h2, x1, maps["ffn"], banks["ffn"], *ck.ln(i, "ffn"), eps, "ffn", plain, 1)


def fast_slot(g: GraphBuilder, h: str, x: str, groups, bank: dict, lw, lb, eps: float, loc: str, plain: str, k: int) -> str:
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

    is_plain = g.op("Gather", [plain, g.const(k, f"fast_slot_{k}", np.int64)], axis=0)
    return if_branches(g, is_plain, lambda b: b.layer_norm(b.op("Add", [h, x]), lw, lb, eps, ln_name), pfeiffer,
                       f"{loc}_fast", ("plain", "pfeiffer"))
