"""Adapter methods beyond the sequential bottleneck, as hooks of the layer graph (issue 14 item 3;
`graphs_layer.py`, models/README.md "Layer graphs").

Each function takes the builder, activations grouped `[G, S, ...]` (tokens that share a bank row,
graphs_layer.Groups) and the weights gathered per group `[G, ...]`.

- Parallel bottleneck adapters (`par_bn`, `is_parallel`): the library's ParallelAdapter reads the
  sub-layer's *input* `x` instead of its output: a rule column (`parallel`) picks the adapter input,
  the rest of the slot rule (residual `h`, LayerNorm after) is shared with the sequential adapters.
"""
from __future__ import annotations

from .onnx_builder import GraphBuilder


def parallel_input(g: GraphBuilder, parallel: str, x: str, u: str) -> str:
    """The bottleneck's input: `x` (the sub-layer input) where the row's `parallel` flag ([G,1,1]
    bool) is set, else the sequential input `u`; the chosen tensor is taken bit for bit."""
    return g.op("Where", [parallel, x, u])


# ---- LoRA and (IA)^3: a per-layer "methods" bank on the projections ---------------------------------
# The library wraps these nn.Linear modules (BERT naming; the checkpoint reader maps the others):
# query / key / value of self-attention, the FFN's intermediate and output dense layers.
TARGETS = ("query", "key", "value", "intermediate", "output")
METHOD_TENSORS = ("lora_a", "lora_b", "scale")


def target_dims(H: int, ffn: int) -> dict:
    """(in, out) of every target projection."""
    return {"query": (H, H), "key": (H, H), "value": (H, H), "intermediate": (H, ffn), "output": (ffn, H)}


def method_inputs(g: GraphBuilder, H: int, ffn: int) -> dict:
    """The methods bank inputs, per target: `lora_a [N, in, r]`, `lora_b [N, r, out]` (the library's
    `alpha / r` scaling folded in) and `scale [N, 1, out]` ((IA)^3's vector, ones where a row has
    none). Row 0 = zeros / ones = the plain projection. (Which tokens take which row: the layer's
    `methods_*` group maps.)"""
    from .onnx_builder import F
    bank = {}
    for t, (i, o) in target_dims(H, ffn).items():
        n, r = "methods_bank_rows", f"methods.{t}.width"
        dims = {"lora_a": [n, i, r], "lora_b": [n, r, o], "scale": [n, 1, o]}
        bank[t] = {k: g.input(f"methods.{t}.{k}", F, dims[k]) for k in METHOD_TENSORS}
    return bank


def gather_methods(g: GraphBuilder, bank: dict, targets, index: str) -> dict:
    """The methods weights of `targets`, one row per activation row: `[G, ...]`."""
    return {t: {k: g.op("Gather", [bank[t][k], index], axis=0) for k in METHOD_TENSORS} for t in targets}


def any_method(g: GraphBuilder, index: str) -> str:
    """Whether any row uses the methods bank (a bool scalar)."""
    import numpy as np
    return g.op("Greater", [g.op("ReduceMax", [index], keepdims=0), g.const(0, "methods_none", np.int64)])


def if_methods(g: GraphBuilder, cond: str, with_methods, plain, name: str) -> str:
    """`If(cond)`: the nodes `with_methods(b)` builds, else those `plain(b)` builds (`if_branches`).
    A batch whose rows use no LoRA / (IA)^3 runs the plain projections alone: the methods cost it
    nothing."""
    return if_branches(g, cond, with_methods, plain, name, ("methods", "plain"))


def if_branches(g: GraphBuilder, cond: str, then, otherwise, name: str, labels=("then", "else"), out: str | None = None) -> str:
    """`If(cond)`: the nodes `then(b)` builds, else those `otherwise(b)` builds, each into a
    sub-builder `b` sharing `g`'s initializers (the layer's weights are stored once); `out` names
    the result."""
    from onnx import helper

    from .onnx_builder import F

    def branch(build, label):
        b = GraphBuilder(f"{name}_{label}")
        b.inits, b._const_names, b.fresh = g.inits, g._const_names, g.fresh
        out = build(b)
        return helper.make_graph(b.nodes, f"{name}_{label}", [], [helper.make_tensor_value_info(out, F, None)])

    return g.op("If", [cond], out, then_branch=branch(then, labels[0]), else_branch=branch(otherwise, labels[1]))


def method_projection(g: GraphBuilder, groups, x: str, y: str, w: dict, width: int) -> str:
    """`(y + (x @ A) @ B) * s` for a projection `y = x W + b` of packed tokens `x` ([N, in]), on the
    tokens grouped by methods row (`groups`: graphs_layer.Groups; `w` gathered per group): LoRA adds
    the low-rank delta (`composition_mode` "add"), (IA)^3 scales the output ("scale"). With A = B = 0
    and s = 1 (row 0, and every row of a task without that method) the result is `y` exactly."""
    xs, ys = groups.split(g, x), groups.split(g, y)  # [G, S, in], [G, S, out]
    delta = g.op("MatMul", [g.op("MatMul", [xs, w["lora_a"]]), w["lora_b"]])
    return groups.join(g, g.op("Mul", [g.op("Add", [ys, delta]), w["scale"]]), width=width)


def methods_bank(entries: list, H: int, ffn: int) -> dict:
    """One layer's methods bank for tests and tools (the server builds it in Rust the same way):
    `entries` are dicts target -> {"lora_a": [in, r], "lora_b": [r, out] (scaling folded in),
    "scale": [out]} (any part may be absent); row 0 is "no method"."""
    import numpy as np
    entries = [{}] + list(entries)
    out = {}
    for t, (i, o) in target_dims(H, ffn).items():
        r = max([1] + [e[t]["lora_a"].shape[1] for e in entries if "lora_a" in e.get(t, {})])
        n = len(entries)
        a, b, s = np.zeros((n, i, r), np.float32), np.zeros((n, r, o), np.float32), np.ones((n, 1, o), np.float32)
        for j, e in enumerate(entries):
            w = e.get(t, {})
            if "lora_a" in w:
                k = w["lora_a"].shape[1]
                a[j, :, :k], b[j, :k, :] = w["lora_a"], w["lora_b"]
            if "scale" in w:
                s[j, 0] = w["scale"]
        out.update({f"methods.{t}.lora_a": a, f"methods.{t}.lora_b": b, f"methods.{t}.scale": s})
    return out
