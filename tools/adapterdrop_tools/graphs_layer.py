"""One graph per backbone layer with adapter banks as inputs (issues 12 and 15, models/README.md "Layer graphs").

`layers/<i>/layer.onnx` runs attention, the attention slot, the FFN and the FFN slot of layer i for
every row of a batch, whatever adapters the rows use, on **packed tokens**: `hidden` is `[tokens, H]`,
the real tokens of every row one after the other, so per-token work (projections, FFN, LayerNorms,
residuals, slots) computes no padding. Attention gathers its rows into `[rows, T]` (`attention_gather`,
pads masked) and scatters back (`attention_scatter`): padding exists only inside the score and
context products.

Each slot groups the tokens by bank row (`<loc>_group` `[G, S]`: the tokens taking bank row
`<loc>_index[g]`, G distinct bank rows, S the largest group) so the adapter's weights are gathered
once per group (`[G, H, r]`), runs the slot rule on `[G, S, H]` and puts the tokens back in order
(`<loc>_ungroup`). The group map indexes the tokens *before* the slot, so it also does AdapterDrop's
row expansion (a token of a split row appears once per copy): the token count may grow at each
slot. The rule (LayerNorm placement, residual, activation, scaling) is data too, one flag row per
bank row (graphs_rule.py: only the branches the batch's groups take run, each bit for bit); bank
row 0 gives `LN(h + x)`, the plain slot, exactly.

`Stack` (MAD-X, issue 14 item 4): each slot has a second bank, `<loc>.stack.*`, indexed by the same
bank rows, holding the *lower* adapter of a stack (the language adapter). Its rule runs first,
without the final LayerNorm (`ln_after` 0), and its output is the upper adapter's `h`, as the
library's `Stack` passes it on. A stack row is a row with an activation flag; every other row
(all zeros, as a freed row is) passes `h` through unchanged, and a batch without stack rows skips
the step (`If`), so it costs them nothing.

A slot whose tokens all take one bank row, in order (one task, plain rows, a layer AdapterDrop drops
for the whole batch, Pfeiffer's attention slot beside any tasks), with the plain or Pfeiffer rule and
no stack row, runs without the grouping, the stack step or the rule dispatch: graphs_fast.py (an
`If` per slot; same bits)."""
from __future__ import annotations

import numpy as np

from .checkpoint import Checkpoint
from .graphs_backbone import attention_body, ffn_body
from .graphs_fast import fast_slot, one_group
from .graphs_methods import any_method, gather_methods, if_branches, if_methods, method_inputs, method_projection
from .graphs_rule import ACTIVATIONS, COL, K, RULE_COLUMNS, slot_rule  # noqa: F401 (re-exported)
from .onnx_builder import F, I64, GraphBuilder

LOCATIONS = ("attention", "ffn")
BANK_TENSORS = ("down_w", "down_b", "up_w", "up_b", "rule")
# Inputs of layer.onnx before the banks, in order (the server checks the same list).
MAP_INPUTS = ("hidden", "attention_gather", "attention_mask", "attention_scatter",
              "attention_group", "attention_index", "attention_ungroup", "ffn_group", "ffn_index", "ffn_ungroup")


def layer_graph(ck: Checkpoint, i: int, dispatch: bool = True, capturable: bool = False):
    """(packed hidden, attention maps, group maps, banks) -> packed y; see the module doc. `dispatch`
    False: every slot in the general rule's form only (graphs_rule.slot_rule; for tests and benches).
    `capturable`: no `If` anywhere (ONNX Runtime refuses CUDA graphs for a graph with control flow):
    the general rule, and the methods projections and the stack step computed for every batch (row
    0 / an all-zero stack row give the plain values exactly), `layer_capturable.onnx`."""
    dispatch = dispatch and not capturable
    H = ck.hidden_size
    g = GraphBuilder(f"layer{i}")
    hidden = g.input("hidden", F, ["tokens0", H])
    gather = g.input("attention_gather", I64, ["rows0", "seq"])
    mask = g.input("attention_mask", I64, ["rows0", "seq"])
    scatter = g.input("attention_scatter", I64, ["tokens0"])
    maps = {}
    for loc, n in (("attention", "1"), ("ffn", "2")):
        maps[loc] = Groups(g.input(f"{loc}_group", I64, [f"groups{n}", f"width{n}"]),
                           g.input(f"{loc}_index", I64, [f"groups{n}"]),
                           g.input(f"{loc}_ungroup", I64, [f"tokens{n}"]), H)
    banks = {loc: bank_inputs(g, loc, H) for loc in LOCATIONS}
    stacks = {loc: bank_inputs(g, f"{loc}.stack", H) for loc in LOCATIONS}
    methods = method_inputs(g, H, ck.intermediate_size)
    g.output("y", F, ["tokens2", H])
    # LoRA / (IA)^3 (graphs_methods.py), only when a group uses them: on the entering tokens grouped
    # by methods row, then on the tokens after the attention slot.
    mg = {loc: Groups(g.input(f"{p}_group", I64, [f"mgroups{n}", f"mwidth{n}"]), g.input(f"{p}_index", I64, [f"mgroups{n}"]),
                      g.input(f"{p}_ungroup", I64, [f"tokens{n}"]), H)
          for loc, p, n in (("attention", "methods", "0"), ("ffn", "methods_ffn", "1"))}

    def with_methods(b, loc, targets, body):
        w = gather_methods(b, methods, targets, mg[loc].index)
        return body(b, lambda t, x, y: method_projection(b, mg[loc], x, y, w[t], out_width(t)))

    def out_width(t):
        return ck.intermediate_size if t == "intermediate" else H

    def attention(b, hook=None):
        return attention_body(b, ck, i, hidden, mask, gather=gather, scatter=scatter, hook=hook)

    def ffn(b, hook=None):
        return ffn_body(b, ck, i, x1, hook=hook)

    used = None if capturable else any_method(g, mg["attention"].index)

    def projections(loc, targets, body):
        if capturable:
            return with_methods(g, loc, targets, body)
        return if_methods(g, used, lambda b: with_methods(b, loc, targets, body), body, loc)

    h1 = projections("attention", ("query", "key", "value"), attention)
    x1 = bank_slot(g, h1, hidden, maps["attention"], banks["attention"], *ck.ln(i, "attention"), ck.eps, "attention",
                   stack=stacks["attention"], dispatch=dispatch, capturable=capturable)
    h2 = projections("ffn", ("intermediate", "output"), ffn)
    bank_slot(g, h2, x1, maps["ffn"], banks["ffn"], *ck.ln(i, "ffn"), ck.eps, "ffn", out="y", stack=stacks["ffn"],
              dispatch=dispatch, capturable=capturable)
    if capturable:  # the stack's "any row" flag only chose an `If`'s branch
        prune(g, "y")
    return g.model()


def prune(g: GraphBuilder, output: str) -> None:
    """Drops the nodes of `g` that `output` does not depend on."""
    need, kept = {output}, []
    for node in reversed(g.nodes):
        if any(o in need for o in node.output):
            need.update(node.input)
            kept.append(node)
    g.nodes = kept[::-1]


def bank_inputs(g: GraphBuilder, loc: str, H: int) -> dict:
    n, r = f"{loc}_bank_rows", f"{loc}_bank_width"
    dims = {"down_w": [n, H, r], "down_b": [n, 1, r], "up_w": [n, r, H], "up_b": [n, 1, H], "rule": [n, 1, K]}
    return {t: g.input(f"{loc}.{t}", F, dims[t]) for t in BANK_TENSORS}


class Groups:
    """A packed tensor plus a per-token bank choice, as per-group segments and back.

    `group` [G, S]: packed token of each group position (pads: any token, their results are
    dropped); `index` [G]: each group's bank row; `ungroup` [N']: position g*S+s of each output
    token. Per-task weights are gathered once per group (`weights`), so any per-group function
    `[G, S, H]` x `[G, ...]` (the bottleneck slot here, LoRA deltas or (IA)^3 scales elsewhere) runs as
    one batched op whatever tasks the batch mixes."""

    def __init__(self, group: str, index: str, ungroup: str, width: int):
        self.group, self.index, self.ungroup, self.width = group, index, ungroup, width

    def split(self, g: GraphBuilder, packed: str) -> str:
        """[N, W] packed -> [G, S, W] grouped."""
        return g.op("Gather", [packed, self.group], axis=0)

    def weights(self, g: GraphBuilder, bank: str) -> str:
        """[N_bank, ...] bank -> [G, ...], each group's bank row."""
        return g.op("Gather", [bank, self.index], axis=0)

    def join(self, g: GraphBuilder, grouped: str, out: str | None = None, width: int | None = None) -> str:
        """[G, S, W] grouped -> [N', W] packed (in the order `ungroup` gives)."""
        w = self.width if width is None else width
        flat = g.op("Reshape", [grouped, g.const([-1, w], f"groups_flat_{w}", np.int64)])
        return g.op("Gather", [flat, self.ungroup], out, axis=0)


def bank_slot(g: GraphBuilder, h: str, x: str, groups: Groups, bank: dict, lw, lb, eps: float, loc: str,
              out: str | None = None, stack: dict | None = None, dispatch: bool = True, capturable: bool = False) -> str:
    """The AdapterHub slot rule (graphs_rule.py) on token groups, each with its bank row's weights
    and flags; packed in, packed out. `stack`: the lower adapters' bank (module doc), run first on
    the rows that have one (a batch without stack rows skips it: `If`; `capturable`: always run, its
    `Where` passing `h` through bit for bit where a group has no stack row). A slot taking one bank row
    for every token, in order, with the plain or Pfeiffer rule and no stack row, skips the grouping and
    the rule dispatch (graphs_fast.py; same bits; not in the capturable graph, which has no `If`)."""
    if dispatch and stack is not None:  # one bank row for every token, in order: graphs_fast.py
        ok, plain = one_group(g, x, groups, bank, stack)
        return if_branches(g, ok, lambda b: fast_slot(b, h, x, groups, bank, lw, lb, eps, loc, plain),
                           lambda b: grouped_slot(b, h, x, groups, bank, lw, lb, eps, loc, stack, dispatch), f"{loc}_slot",
                           ("one_group", "grouped"), out=out)
    return grouped_slot(g, h, x, groups, bank, lw, lb, eps, loc, stack, dispatch, out, capturable)


def grouped_slot(g: GraphBuilder, h: str, x: str, groups: Groups, bank: dict, lw, lb, eps: float, loc: str, stack: dict | None,
                 dispatch: bool, out: str | None = None, capturable: bool = False) -> str:
    """`bank_slot` on the tokens grouped by bank row (any batch)."""
    xs = groups.split(g, x)
    if stack is None:
        hs = groups.split(g, h)
    elif capturable:
        active = stack_rows(g, groups, stack)[1]
        hs = stack_step(g, groups.split(g, h), xs, groups, stack, active, lw, lb, eps, loc)
    else:  # `h` grouped inside each branch: no copy of it on the way out of the `If`
        used, active = stack_rows(g, groups, stack)
        hs = if_branches(g, used, lambda b: stack_step(b, groups.split(b, h), xs, groups, stack, active, lw, lb, eps, loc),
                         lambda b: groups.split(b, h), f"{loc}_stack")
    w = {t: (lambda b, t=t: groups.weights(b, bank[t])) for t in BANK_TENSORS if t != "rule"}
    w["rule"] = groups.weights(g, bank["rule"])
    return groups.join(g, slot_rule(g, hs, xs, w, lw, lb, eps, loc, dispatch=dispatch), out)


def stack_rows(g: GraphBuilder, groups: Groups, stack: dict) -> tuple:
    """(whether any group has a stack row: bool scalar, which groups do: `[G, 1, 1]`); a stack row is
    one with an activation flag."""
    rule = groups.weights(g, stack["rule"])  # [G, 1, K]
    acts = g.op("Slice", [rule, g.const([COL["relu"]], "stack_act_from", np.int64),
                          g.const([COL["sigmoid"] + 1], "stack_act_to", np.int64), g.const([2], "rule_axis", np.int64)])
    active = g.op("Greater", [g.op("ReduceSum", [acts, g.const([2], "rule_axis", np.int64)], keepdims=1),
                              g.const(0.0, "stack_none")])  # [G, 1, 1]
    used = g.op("Greater", [g.op("ReduceMax", [acts], keepdims=0), g.const(0.0, "stack_none")])
    return used, active


def stack_step(g: GraphBuilder, h: str, x: str, groups: Groups, stack: dict, active: str, lw, lb, eps: float,
               loc: str) -> str:
    """The lower adapter of a `Stack` on `[G, S, H]` groups: its rule output (written with
    `ln_after` 0) where the group's stack row is `active`, else `h` bit for bit. Stacks are rare:
    their rule takes the general form (no dispatch `If`s, which cost session start-up)."""
    w = {t: groups.weights(g, stack[t]) for t in BANK_TENSORS}
    return g.op("Where", [active, slot_rule(g, h, x, w, lw, lb, eps, f"{loc}.stack", ln_weights=f"{loc}.ln",
                                          dispatch=False), h])


def pack_maps(lens, rows, index) -> dict:
    """Host side of one slot (numpy, for tests and tools; the server's plan builds the same maps):
    `lens[j]` tokens of entering row j (packed in row order), `rows[k]` the entering row output row
    k continues, `index[k]` its bank row -> `{group, index, ungroup}` (groups in order of first use)."""
    starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    order: list = []
    members: dict = {}
    ungroup_at = []
    for k, (src, b) in enumerate(zip(rows, index)):
        if b not in members:
            order.append(b)
            members[b] = []
        toks = list(range(starts[src], starts[src] + lens[src]))
        ungroup_at.append((b, len(members[b]), len(toks)))
        members[b].extend(toks)
    width = max(1, max(len(m) for m in members.values()))
    group = np.zeros((len(order), width), np.int64)
    for gi, b in enumerate(order):
        group[gi, :len(members[b])] = members[b]
    gi_of = {b: gi for gi, b in enumerate(order)}
    ungroup = np.concatenate([np.arange(n, dtype=np.int64) + gi_of[b] * width + at for b, at, n in ungroup_at])
    return {"group": group, "index": np.asarray(order, np.int64), "ungroup": ungroup}


def methods_maps(lens0, index0, attention_rows) -> dict:
    """Host side of the methods groups (numpy, for tests and tools): entering row j (of `lens0[j]`
    tokens) takes methods row `index0[j]`, and so does every row after the attention slot that
    continues it (`attention_rows`) -> the `methods_*` and `methods_ffn_*` inputs."""
    lens1 = [lens0[r] for r in attention_rows]
    out = {f"methods_{k}": v for k, v in pack_maps(lens0, range(len(lens0)), list(index0)).items()}
    index1 = [index0[r] for r in attention_rows]
    out.update({f"methods_ffn_{k}": v for k, v in pack_maps(lens1, range(len(lens1)), index1).items()})
    return out


def attention_maps(lens, mask) -> dict:
    """`attention_gather` / `attention_mask` / `attention_scatter` for rows of `lens` tokens (packed in
    row order); `mask` [rows, >= max(lens)] the rows' own 0/1 masks."""
    t = max(lens)
    starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    gather = np.zeros((len(lens), t), np.int64)
    m = np.zeros((len(lens), t), np.int64)
    scatter = []
    for j, n in enumerate(lens):
        gather[j, :n] = np.arange(starts[j], starts[j] + n)
        m[j, :n] = mask[j, :n]
        scatter.extend(j * t + p for p in range(n))
    return {"attention_gather": gather, "attention_mask": m, "attention_scatter": np.asarray(scatter, np.int64)}


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


def stack_bank(entries: list, H: int) -> dict:
    """The `<loc>.stack.*` bank for `bank`'s rows: `entries[j]` the lower adapter of row j + 1
    (`(adapter, slot_weights)`), or None (no stack: an all-zero row, which passes `h` through);
    each stack row's rule has `ln_after` 0 (the library's Stack passes the output on before it)."""
    out = bank(entries, H)
    out["rule"][0] = 0.0
    for j, e in enumerate(entries, start=1):
        out["rule"][j, 0] = 0.0 if e is None else out["rule"][j, 0]
    out["rule"][:, 0, COL["ln_after"]] = 0.0
    return out


def no_stack_rows(feeds: dict, H: int) -> dict:
    """The `<loc>.stack.*` inputs of a batch without stacks (for tests and tools): as many all-zero
    rows as `feeds`' `<loc>.rule` bank has."""
    return {f"{loc}.stack.{k}": v for loc in LOCATIONS
            for k, v in stack_bank([None] * (len(feeds[f"{loc}.rule"]) - 1), H).items()}


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
