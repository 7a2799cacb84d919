"""Task graphs: one AdapterHub bottleneck slot with the backbone LayerNorm baked in, and the head."""
from __future__ import annotations

import numpy as np

from .adapterhub import Adapter, Head, SlotWeights
from .onnx_builder import F, GraphBuilder, hidden_dims


def adapter_slot_graph(adapter: Adapter, sw: SlotWeights, ln_weight, ln_bias, eps: float, name: str):
    """(h, x) -> y following the general slot rule of adapter-math.md:
    u = LN(h + x) if original_ln_before else h;  r = h if residual_before_ln (h + x for "post_add") else u;
    out = scaling * A(u) + r;  y = LN(out + x) if original_ln_after else out."""
    H = adapter.hidden_size
    g = GraphBuilder(name)
    h = g.input("h", F, hidden_dims(H))
    x = g.input("x", F, hidden_dims(H))
    g.output("y", F, hidden_dims(H))
    s = g.op("Add", [h, x]) if (adapter.original_ln_before or adapter.residual_before_ln == "post_add") else None
    u = g.layer_norm(s, ln_weight, ln_bias, eps, "ln") if adapter.original_ln_before else h
    if adapter.residual_before_ln == "post_add":
        r = s
    elif adapter.residual_before_ln:
        r = h
    else:
        r = u
    down = g.linear(u, sw.down_w, sw.down_b, "adapter_down")
    up = g.linear(g.activation(down, adapter.non_linearity), sw.up_w, sw.up_b, "adapter_up")
    if adapter.scaling != 1.0:
        up = g.op("Mul", [up, g.const(adapter.scaling, "scaling")])
    out = g.op("Add", [up, r])
    if adapter.original_ln_after:
        g.layer_norm(g.op("Add", [out, x]), ln_weight, ln_bias, eps, "ln", out="y")
    else:
        g.op("Identity", [out], "y")
    return g.model()


def head_graph(head: Head, hidden_size: int):
    """hidden [B,T,H] -> logits [B,C] = W2 tanh(W1 hidden[:, 0] + b1) + b2."""
    g = GraphBuilder("head")
    hid = g.input("hidden", F, hidden_dims(hidden_size))
    g.output("logits", F, ["batch", int(head.w2.shape[0])])
    first = g.op("Gather", [hid, g.const(0, "first_token", np.int64)], axis=1)  # [B,H]
    z = g.op("Tanh", [g.linear(first, head.w1, head.b1, "dense")])
    g.linear(z, head.w2, head.b2, "out_proj", out="logits")
    return g.model()
