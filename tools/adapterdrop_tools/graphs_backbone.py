"""Backbone graphs: embeddings, per-layer attention / ffn segments, plain slots."""
from __future__ import annotations

import numpy as np

from .checkpoint import Checkpoint
from .onnx_builder import F, F32_MIN, I64, GraphBuilder, hidden_dims


def projects_embeddings(ck: Checkpoint) -> bool:
    """ELECTRA with `embedding_size` != `hidden_size`: `embeddings_project` follows the LayerNorm."""
    return "embeddings_project.weight" in ck.weights


def embedding_size(ck: Checkpoint) -> int:
    """Width of the embeddings' LayerNorm output (before `embeddings_project`, where there is one)."""
    return int(ck.get("embeddings.LayerNorm.weight").shape[0])


def embeddings_graph(ck: Checkpoint):
    """(input_ids, token_type_ids) -> hidden [B,T,H]. A projecting backbone (ELECTRA) also outputs
    `embedded` [B,T,E], the LayerNorm's output before `embeddings_project`: a Stack's invertible
    adapter runs there, then `embeddings_project_graph` (the plain path reads `hidden`, as before)."""
    H = ck.hidden_size
    g = GraphBuilder("embeddings")
    ids = g.input("input_ids", I64, ["batch", "seq"])
    tt = g.input("token_type_ids", I64, ["batch", "seq"])
    g.output("hidden", F, hidden_dims(H))
    project = projects_embeddings(ck)
    if project:
        g.output("embedded", F, hidden_dims(embedding_size(ck)))
    word = g.op("Gather", [g.const(ck.get("embeddings.word_embeddings.weight"), "word_embeddings"), ids], axis=0)
    pos_table = g.const(ck.get("embeddings.position_embeddings.weight"), "position_embeddings")
    if ck.roberta_like:
        # pad_id + cumsum(ids != pad) on real tokens, pad_id on pads
        pad = g.const(ck.pad_token_id, "pad_id", np.int64)
        not_pad = g.op("Cast", [g.op("Not", [g.op("Equal", [ids, pad])])], to=I64)
        csum = g.op("CumSum", [not_pad, g.const(1, "axis1", np.int64)])
        pos_ids = g.op("Add", [g.op("Mul", [csum, not_pad]), pad])
        pos = g.op("Gather", [pos_table, pos_ids], axis=0)  # [B,T,H]
    else:
        seq_len = g.op("Shape", [ids], start=1, end=2)  # [T] as a 1-D tensor
        zero, axis0 = g.const([0], "slice_start", np.int64), g.const([0], "slice_axis", np.int64)
        pos = g.op("Slice", [pos_table, zero, seq_len, axis0])  # rows 0..T-1: [T,H], broadcasts over B
    if ck.has_token_types:
        types = g.op("Gather", [g.const(ck.get("embeddings.token_type_embeddings.weight"), "token_type_embeddings"), tt],
                     axis=0)
        s = g.op("Add", [g.op("Add", [word, types]), pos])
    else:  # DistilBERT: no token-type embeddings; `token_type_ids` stays an (unused) input of the contract
        s = g.op("Add", [word, pos])
    ln = g.layer_norm(s, ck.get("embeddings.LayerNorm.weight"), ck.get("embeddings.LayerNorm.bias"),
                      ck.eps, "embeddings.LayerNorm", out="embedded" if project else "hidden")
    if project:
        project_body(g, ck, ln)
    return g.model()


def project_body(g: GraphBuilder, ck: Checkpoint, x: str) -> str:
    """ELECTRA's `embeddings_project` (E -> H) inside `g`, written to `hidden`."""
    return g.linear(x, ck.get("embeddings_project.weight"), ck.get("embeddings_project.bias"), "embeddings_project",
                    out="hidden")


def embeddings_project_graph(ck: Checkpoint):
    """embedded [B,T,E] -> hidden [B,T,H]: the same `embeddings_project` nodes as in the embeddings
    graph, for rows whose `embedded` states a Stack's invertible adapter changed."""
    g = GraphBuilder("embeddings_project")
    x = g.input("embedded", F, hidden_dims(embedding_size(ck)))
    g.output("hidden", F, hidden_dims(ck.hidden_size))
    project_body(g, ck, x)
    return g.model()


def attention_graph(ck: Checkpoint, i: int):
    """(hidden, attention_mask) -> h = attention.output.dense(SelfAttention(hidden))."""
    g = GraphBuilder(f"layer{i}_attention")
    x = g.input("hidden", F, hidden_dims(ck.hidden_size))
    mask = g.input("attention_mask", I64, ["batch", "seq"])
    g.output("h", F, hidden_dims(ck.hidden_size))
    attention_body(g, ck, i, x, mask, out="h")
    return g.model()


def attention_body(g: GraphBuilder, ck: Checkpoint, i: int, x: str, mask: str, out: str | None = None,
                   gather: str | None = None, scatter: str | None = None, hook=None) -> str:
    """The attention segment's nodes inside `g` (shared by attention.onnx and layer.onnx).

    Padded (`x` [B,T,H]) by default. Packed (`x` [N,H], the real tokens of every row one after the
    other) with `gather` ([B,T] token of each row position, pads any token: masked) and `scatter`
    ([N] position b*T+t of each token): the projections run on the N tokens, only the score and
    context products see the rows' padding. `hook(name, x, y) -> y'`, if given, rewrites the query /
    key / value projections (layer.onnx: LoRA, (IA)^3; before the gather, on the tokens)."""
    H, nh = ck.hidden_size, ck.num_heads
    d = H // nh
    heads_shape = g.const([0, 0, nh, d], "heads_shape", np.int64)

    def proj(name):
        y = g.linear(x, ck.layer(i, f"attention.self.{name}.weight"), ck.layer(i, f"attention.self.{name}.bias"), name)
        if hook is not None:
            y = hook(name, x, y)
        if gather is not None:
            y = g.op("Gather", [y, gather], axis=0)  # [B,T,H]
        return g.op("Reshape", [y, heads_shape])  # [B,T,nh,d]

    q = g.op("Transpose", [proj("query")], perm=[0, 2, 1, 3])  # [B,nh,T,d]
    k = g.op("Transpose", [proj("key")], perm=[0, 2, 3, 1])  # [B,nh,d,T]
    v = g.op("Transpose", [proj("value")], perm=[0, 2, 1, 3])  # [B,nh,T,d]
    scores = g.op("Mul", [g.op("MatMul", [q, k]), g.const(1.0 / np.sqrt(d), "inv_sqrt_d")])
    m = g.op("Cast", [mask], to=F)
    term = g.op("Mul", [g.op("Sub", [g.const(1.0, "one_f"), m]), g.const(F32_MIN, "f32_min")])
    term = g.op("Unsqueeze", [term, g.const([1, 2], "unsq_axes", np.int64)])  # [B,1,1,T]
    probs = g.op("Softmax", [g.op("Add", [scores, term])], axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])  # [B,T,nh,d]
    if scatter is not None:  # back to the packed tokens: [B*T,H] rows picked by `scatter`
        ctx = g.op("Reshape", [ctx, g.const([-1, H], "flat_shape", np.int64)])
        ctx = g.op("Gather", [ctx, scatter], axis=0)
    else:
        ctx = g.op("Reshape", [ctx, g.const([0, 0, H], "merge_shape", np.int64)])
    return g.linear(ctx, ck.layer(i, "attention.output.dense.weight"), ck.layer(i, "attention.output.dense.bias"),
                    "attention.output.dense", out=out)


def ffn_graph(ck: Checkpoint, i: int):
    """hidden -> h = output.dense(GELU(intermediate.dense(hidden)))."""
    g = GraphBuilder(f"layer{i}_ffn")
    x = g.input("hidden", F, hidden_dims(ck.hidden_size))
    g.output("h", F, hidden_dims(ck.hidden_size))
    ffn_body(g, ck, i, x, out="h")
    return g.model()


def ffn_body(g: GraphBuilder, ck: Checkpoint, i: int, x: str, out: str | None = None, hook=None) -> str:
    """The FFN segment's nodes inside `g` (shared by ffn.onnx and layer.onnx); `hook` as in
    `attention_body`, for the "intermediate" and "output" dense layers."""
    m = g.linear(x, ck.layer(i, "intermediate.dense.weight"), ck.layer(i, "intermediate.dense.bias"), "intermediate.dense")
    if hook is not None:
        m = hook("intermediate", x, m)
    m = g.activation(m, "gelu")
    if hook is None:
        return g.linear(m, ck.layer(i, "output.dense.weight"), ck.layer(i, "output.dense.bias"), "output.dense", out=out)
    y = hook("output", m, g.linear(m, ck.layer(i, "output.dense.weight"), ck.layer(i, "output.dense.bias"), "output.dense"))
    return g.op("Identity", [y], out) if out else y


def plain_slot_graph(ln_weight, ln_bias, eps: float, name: str):
    """(h, x) -> y = LN(h + x). LN initializers are named `ln.weight` / `ln.bias`."""
    H = int(np.asarray(ln_weight).shape[0])
    g = GraphBuilder(name)
    h = g.input("h", F, hidden_dims(H))
    x = g.input("x", F, hidden_dims(H))
    g.output("y", F, hidden_dims(H))
    g.layer_norm(g.op("Add", [h, x]), ln_weight, ln_bias, eps, "ln", out="y")
    return g.model()
