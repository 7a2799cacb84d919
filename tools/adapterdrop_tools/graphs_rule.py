"""The slot rule of the layer graph (graphs_layer.py) on `[G, S, H]` token groups: the general
AdapterHub rule, and the cheaper forms a batch takes when its groups agree (issue 12, "slotrule").

One graph serves every adapter config because the rule is data (a flag row per bank row, `RULE_COLUMNS`):
the general form computes both LayerNorms, the three adapter inputs, five activations and three
residuals for every group and picks each group's with `Where`. Most batches need one branch per
decision (a Pfeiffer batch: LayerNorm before, relu, residual `h`, LayerNorm after), so each decision
is an `If` on the batch's rule rows: when every group takes the same branch only that branch runs,
otherwise the general `Where` form. A branch computes its tensor with the same ops as the general
form, so the result is the general rule's bit for bit, whichever way the batch is dispatched.

A group with scale 0 (bank row 0: plain rows and AdapterDrop's dropped layers; freed rows) adds
`(z W_up + b_up) * 0 = ±0` to its residual whatever its adapter input and activation (all finite),
so for those two decisions it agrees with any other group; its residual and LayerNorm-after flags
still count. When every group has scale 0 (a plain batch, a layer AdapterDrop dropped for every
row, the attention slot of Pfeiffer tasks) the bottleneck is not computed at all: `LN(h + x)`, the
plain slot. Dispatch costs a few `[G, 1, K]` ops and one `If` per decision taken."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .graphs_methods import if_branches, parallel_input
from .onnx_builder import GraphBuilder

# Column order of a bank's `rule` row ([N, 1, K]); the server writes the same layout.
RULE_COLUMNS = ("ln_before", "ln_after", "residual_h", "residual_u", "residual_s", "scale",
                "relu", "silu", "gelu", "tanh", "sigmoid", "parallel")
K = len(RULE_COLUMNS)
COL = {name: i for i, name in enumerate(RULE_COLUMNS)}
ACTIVATIONS = RULE_COLUMNS[6:11]
# Decisions a scale-0 group does not use (module doc).
UNUSED_AT_SCALE_0 = ("ln_before", "parallel") + ACTIVATIONS
# Activations with a branch of their own (Pfeiffer's default, Houlsby's); every `If` costs session
# start-up time (about 3 ms on MiniLM), so the others take the general form.
ACTIVATION_ORDER = ("relu", "silu")


class Rule:
    """The groups' rule rows `[G, 1, K]`: each group's flags, and whether all / no groups set one."""

    def __init__(self, g: GraphBuilder, rule: str, loc: str, dispatch: bool = True):
        self.rule, self.loc = rule, loc
        if not dispatch:
            return
        on = g.op("Cast", [g.op("Cast", [rule], to=TensorProto.BOOL)], to=TensorProto.FLOAT)  # 0 / 1
        scale = g.op("Slice", [rule, *(g.const([k], f"rule_{k}", np.int64) for k in (COL["scale"], COL["scale"] + 1)),
                               g.const([2], "rule_axis", np.int64)])
        unused_mask = np.array([c in UNUSED_AT_SCALE_0 for c in RULE_COLUMNS])
        dead = g.op("Equal", [scale, g.const(0.0, "rule_zero")])  # [G, 1, 1]
        unused = g.op("Cast", [g.op("And", [dead, g.const(unused_mask, "rule_unused", np.bool_)])], to=TensorProto.FLOAT)
        lo = g.op("ReduceMin", [g.op("Max", [on, unused])], axes=[0, 1], keepdims=0)  # unused: set
        hi = g.op("ReduceMax", [g.op("Sub", [on, unused])], axes=[0, 1], keepdims=0)  # unused: not set
        self.every = g.op("Greater", [lo, g.const(0.5, "rule_half")])  # [K]: every group sets the flag
        self.no = g.op("Less", [hi, g.const(0.5, "rule_half")])  # [K]: no group sets it
        self.dead = g.op("Greater", [g.op("ReduceMin", [g.op("Cast", [dead], to=TensorProto.FLOAT)], keepdims=0),
                                     g.const(0.5, "rule_half")])  # every group has scale 0

    def all(self, g: GraphBuilder, name: str) -> str:
        return g.op("Gather", [self.every, g.const(COL[name], f"rule_col_{COL[name]}", np.int64)], axis=0)

    def none(self, g: GraphBuilder, name: str) -> str:
        return g.op("Gather", [self.no, g.const(COL[name], f"rule_col_{COL[name]}", np.int64)], axis=0)

    def flag(self, g: GraphBuilder, name: str) -> str:
        """Each group's value of column `name`, `[G, 1, 1]`."""
        k = COL[name]
        return g.op("Slice", [self.rule, g.const([k], f"rule_{k}", np.int64), g.const([k + 1], f"rule_{k + 1}", np.int64),
                              g.const([2], "rule_axis", np.int64)])

    def on(self, g: GraphBuilder, name: str) -> str:
        return g.op("Cast", [self.flag(g, name)], to=TensorProto.BOOL)

    def choose(self, g: GraphBuilder, name: str, when_on, when_off, mixed) -> str:
        """`when_off(b)` if no group sets `name`, `when_on(b)` if every group does, else `mixed(b)`
        (a scale-0 group, which agrees with both where `name` is unused, takes the first)."""
        tag = f"{self.loc}_{name}"
        return if_branches(g, self.none(g, name), when_off,
                           lambda b: if_branches(b, self.all(b, name), when_on, mixed, f"{tag}_all", ("on", "mixed")),
                           tag, ("off", "rest"))


def slot_rule(g: GraphBuilder, h: str, x: str, w: dict, lw, lb, eps: float, loc: str, ln_weights: str | None = None,
              dispatch: bool = True) -> str:
    """The rule on `[G, S, H]` states with per-group weights `w` (`[G, ...]`, graphs_layer.BANK_TENSORS;
    the bottleneck's may be functions `b -> name` that gather them where used: not at all when every
    group has scale 0), dispatched on the groups' agreement (module doc). `loc` names the `If` branches; `ln_weights`
    the LayerNorm's weights (default `<loc>.ln`). `dispatch` False: the general form alone (the
    reference the dispatched graph is tested and timed against)."""
    rule = Rule(g, w["rule"], loc, dispatch)

    def weight(b, t):  # a tensor name, or a function gathering it into builder `b` where it is used
        return w[t](b) if callable(w[t]) else w[t]
    ln_name = ln_weights or f"{loc}.ln"

    def ln(b, t):
        return b.layer_norm(t, lw, lb, eps, ln_name)

    def u_general(b, s):  # the general form: LayerNorm before or not, then the parallel input
        u = b.op("Where", [rule.on(b, "ln_before"), ln(b, s), h])
        return parallel_input(b, rule.on(b, "parallel"), x, u)  # par_bn: the adapter reads the sub-layer input

    def down(u):
        return lambda b: b.op("Add", [b.op("MatMul", [u(b) if callable(u) else u, weight(b, "down_w")]), weight(b, "down_b")])

    def general(b, up, s, u=None):  # the general residual and LayerNorm after; `up` None: every group adds ±0
        r = b.op("Where", [rule.on(b, "residual_h"), h, s if u is None else b.op("Where", [rule.on(b, "residual_u"), u, s])])
        o = r if up is None else b.op("Add", [up, r])
        return b.op("Where", [rule.on(b, "ln_after"), ln(b, b.op("Add", [o, x])), o])

    def tail(b, up, s):  # residual h and LayerNorm after in every group (Pfeiffer, Houlsby, plain rows), else general
        usual = b.op("And", [rule.all(b, "residual_h"), rule.all(b, "ln_after")])
        return if_branches(b, usual, lambda c: ln(c, s if up is None else c.op("Add", [c.op("Add", [up, h]), x])),
                           lambda c: if_branches(c, rule.none(c, "residual_u"), lambda d: general(d, up, s),  # `u` if used
                                                 lambda d: general(d, up, s, u_general(d, s)), f"{loc}_residual_u"),
                           f"{loc}_residual_{'plain' if up is None else 'adapter'}",
                           ("h_ln", "general"))

    def adapters(b):
        s = b.op("Add", [h, x])
        u = lambda c: u_general(c, s)
        sequential = lambda c: rule.choose(c, "ln_before", down(lambda d: ln(d, s)), down(h), down(u))
        pre = if_branches(b, rule.none(b, "parallel"), sequential, down(u), f"{loc}_parallel", ("none", "some"))
        return tail(b, up_projection(b, activation(b, rule, pre, 0)), s)

    def up_projection(b, z):
        return b.op("Mul", [b.op("Add", [b.op("MatMul", [z, weight(b, "up_w")]), weight(b, "up_b")]), rule.flag(b, "scale")])

    if not dispatch:
        s = g.op("Add", [h, x])
        u = u_general(g, s)
        return general(g, up_projection(g, activation(g, rule, down(u)(g), len(ACTIVATION_ORDER))), s, u)
    # Every group with scale 0 (plain rows, dropped layers, Pfeiffer's attention slot): no bottleneck.
    return if_branches(g, rule.dead, lambda b: tail(b, None, b.op("Add", [h, x])), adapters, f"{loc}_scale",
                       ("zero", "adapter"))


def activation(g: GraphBuilder, rule: Rule, pre: str, k: int) -> str:
    """The activation every group uses (`ACTIVATION_ORDER[k:]` tried in turn), else each group's own."""
    if k == len(ACTIVATION_ORDER):
        z = g.activation(pre, "sigmoid")
        for act in ("tanh", "gelu", "silu", "relu"):
            z = g.op("Where", [rule.on(g, act), g.activation(pre, act), z])
        return z
    act = ACTIVATION_ORDER[k]
    return if_branches(g, rule.all(g, act), lambda b: b.activation(pre, act), lambda b: activation(b, rule, pre, k + 1),
                       f"{rule.loc}_{act}", ("on", "rest"))
