"""Independent numpy (float64) reference of a BERT/RoBERTa/XLM-R/DistilBERT/ELECTRA encoder with AdapterHub bottleneck
adapters, AdapterDrop and the classification head, written from adapter-math.md. No ONNX here."""
from __future__ import annotations

import math

import numpy as np

from .adapterhub import Adapter, Head
from .checkpoint import Checkpoint

_erf = np.frompyfunc(math.erf, 1, 1)
F32_MIN = float(np.finfo(np.float32).min)


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def activation(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "relu":
        return np.maximum(x, 0.0)
    if kind == "silu":
        return x / (1.0 + np.exp(-x))
    if kind == "gelu":
        return gelu(x)
    if kind == "tanh":
        return np.tanh(x)
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    raise ValueError(kind)


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def linear(x, w, b):
    """torch layout: w [out, in]."""
    y = x @ np.asarray(w, np.float64).T
    return y if b is None else y + np.asarray(b, np.float64)


class Reference:
    def __init__(self, ck: Checkpoint):
        self.ck = ck
        self.w = {k: np.asarray(v, np.float64) for k, v in ck.weights.items()}
        self.eps = ck.eps

    def L(self, i, key):
        return self.w[f"encoder.layer.{i}.{key}"]

    # ---- backbone pieces -------------------------------------------------------------
    def embeddings(self, ids: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        tt = np.asarray(token_type_ids, np.int64)
        if self.ck.roberta_like:
            pad = self.ck.pad_token_id
            not_pad = (ids != pad).astype(np.int64)
            pos = np.cumsum(not_pad, axis=1) * not_pad + pad
        else:
            pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        e = self.w["embeddings.word_embeddings.weight"][ids] + self.w["embeddings.position_embeddings.weight"][pos]
        if self.ck.has_token_types:  # DistilBERT has none
            e = e + self.w["embeddings.token_type_embeddings.weight"][tt]
        e = layer_norm(e, self.w["embeddings.LayerNorm.weight"], self.w["embeddings.LayerNorm.bias"], self.eps)
        if "embeddings_project.weight" in self.w:  # ELECTRA: embedding_size -> hidden_size
            e = linear(e, self.w["embeddings_project.weight"], self.w["embeddings_project.bias"])
        return e

    def attention(self, i: int, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        B, T, H = x.shape
        nh = self.ck.num_heads
        d = H // nh

        def heads(name):
            y = linear(x, self.L(i, f"attention.self.{name}.weight"), self.L(i, f"attention.self.{name}.bias"))
            return y.reshape(B, T, nh, d).transpose(0, 2, 1, 3)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
        scores = scores + ((1.0 - np.asarray(mask, np.float64)) * F32_MIN)[:, None, None, :]
        scores = scores - scores.max(-1, keepdims=True)
        p = np.exp(scores)
        p = p / p.sum(-1, keepdims=True)
        ctx = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, H)
        return linear(ctx, self.L(i, "attention.output.dense.weight"), self.L(i, "attention.output.dense.bias"))

    def ffn(self, i: int, x: np.ndarray) -> np.ndarray:
        m = gelu(linear(x, self.L(i, "intermediate.dense.weight"), self.L(i, "intermediate.dense.bias")))
        return linear(m, self.L(i, "output.dense.weight"), self.L(i, "output.dense.bias"))

    def ln_of(self, i: int, location: str):
        base = "attention.output.LayerNorm" if location == "attention" else "output.LayerNorm"
        return self.L(i, base + ".weight"), self.L(i, base + ".bias")

    def slot(self, i: int, location: str, h, x, adapter: Adapter | None = None):
        """Plain slot LN(h + x), or the AdapterHub bottleneck rule if an adapter is active here."""
        lw, lb = self.ln_of(i, location)
        sw = None if adapter is None else adapter.slots.get((i, location))
        if sw is None:
            return layer_norm(h + x, lw, lb, self.eps)
        u = layer_norm(h + x, lw, lb, self.eps) if adapter.original_ln_before else h
        if adapter.residual_before_ln == "post_add":
            r = h + x
        elif adapter.residual_before_ln:
            r = h
        else:
            r = u
        a = linear(activation(linear(u, sw.down_w, sw.down_b), adapter.non_linearity), sw.up_w, sw.up_b)
        out = a * adapter.scaling + r
        return layer_norm(out + x, lw, lb, self.eps) if adapter.original_ln_after else out

    def layer(self, i, x0, mask, adapter=None):
        x1 = self.slot(i, "attention", self.attention(i, x0, mask), x0, adapter)
        return self.slot(i, "ffn", self.ffn(i, x1), x1, adapter)

    # ---- whole model -----------------------------------------------------------------
    def encode(self, input_ids, attention_mask, token_type_ids=None, adapter: Adapter | None = None,
               dropped=()):
        """Last hidden state [B,T,H]; adapters are skipped (plain layers) in layers `dropped`."""
        ids = np.asarray(input_ids, np.int64)
        tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, np.int64)
        mask = np.asarray(attention_mask, np.int64)
        x = self.embeddings(ids, tt)
        dropped = set(dropped)
        for i in range(self.ck.num_layers):
            x = self.layer(i, x, mask, None if i in dropped else adapter)
        return x

    def logits(self, input_ids, attention_mask, token_type_ids=None, adapter=None, head: Head | None = None,
               dropped=()):
        hid = self.encode(input_ids, attention_mask, token_type_ids, adapter, dropped)
        return head_logits(hid, head)


# ---- Stack (MAD-X), written from the adapters library and checked against it -------------------
def nice(x: np.ndarray, inv: dict, kind: str = "relu") -> np.ndarray:
    """The invertible adapter "nice" at the embeddings (forward): `x = [x1, x2]` split at H // 2,
    `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)`, F and G two linears with `kind` between; `inv` holds the
    library's `F.0`, `F.2`, `G.0`, `G.2` weights and biases."""
    s = x.shape[-1] // 2
    x1, x2 = x[..., :s], x[..., s:]

    def mlp(z, n):
        return linear(activation(linear(z, inv[f"{n}.0.weight"], inv[f"{n}.0.bias"]), kind), inv[f"{n}.2.weight"],
                      inv[f"{n}.2.bias"])

    y1 = x1 + mlp(x2, "F")
    return np.concatenate([y1, x2 + mlp(y1, "G")], -1)


def stack_slot(ref: "Reference", i: int, location: str, h, x, adapters: list):
    """`Stack(a_1, ..., a_n)` at one slot: each adapter's rule without the final LayerNorm, its output
    the next one's `h`; the last adapter's `original_ln_after` then gives `LN(out + x)`."""
    lw, lb = ref.ln_of(i, location)
    for a in adapters:
        sw = a.slots[(i, location)]
        u = layer_norm(h + x, lw, lb, ref.eps) if a.original_ln_before else h
        r = h + x if a.residual_before_ln == "post_add" else (h if a.residual_before_ln else u)
        h = linear(activation(linear(u, sw.down_w, sw.down_b), a.non_linearity), sw.up_w, sw.up_b) * a.scaling + r
    return layer_norm(h + x, lw, lb, ref.eps) if adapters[-1].original_ln_after else h


def head_logits(hidden: np.ndarray, head: Head) -> np.ndarray:
    z = np.tanh(linear(hidden[:, 0], head.w1, head.b1))
    return linear(z, head.w2, head.b2)


def mean_pool(hidden: np.ndarray, mask) -> np.ndarray:
    m = np.asarray(mask, np.float64)[:, :, None]
    v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def pad_batch(seqs, pad_id: int = 0, type_seqs=None):
    """Unpadded per-sequence ids -> (input_ids, attention_mask, token_type_ids) right-padded arrays."""
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, np.int64)
    mask = np.zeros((len(seqs), T), np.int64)
    tt = np.zeros((len(seqs), T), np.int64)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = s
        mask[r, :len(s)] = 1
        if type_seqs is not None:
            tt[r, :len(s)] = type_seqs[r]
    return ids, mask, tt


# ---- AdapterFusion (adapter-math.md "AdapterFusion"; written from the formulas, no ONNX) ---------
def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def fusion_slot(ref: Reference, i: int, loc: str, h, x, fusion, adapters: list):
    """One fusion slot over `adapters` (Adapter objects, in order); returns (y, alpha [B,T,N])."""
    lw, lb = ref.ln_of(i, loc)
    last = adapters[-1]  # the library takes the pre/post rules from the last fused adapter
    s = h + x
    u = layer_norm(s, lw, lb, ref.eps) if last.original_ln_before else h
    r = s if last.residual_before_ln == "post_add" else (h if last.residual_before_ln else u)
    c, fw = fusion.config, fusion.slots[(i, loc)]
    ups = []
    for a in adapters:
        sw = a.slots[(i, loc)]
        ups.append(linear(activation(linear(u, sw.down_w, sw.down_b), a.non_linearity), sw.up_w, sw.up_b) * a.scaling)
    up = np.stack(ups, axis=2)  # [B,T,N,H]
    if c["residual_before"]:
        up = up + r[:, :, None, :]
    q = h if c["query_before_ln"] else u
    Q = linear(q, fw.q_w, fw.q_b) if c["query"] else q
    K = linear(up, fw.k_w, fw.k_b) if c["key"] else up
    V = linear(up, fw.v_w, None) if (c["value"] and c["value_before_softmax"]) else up
    alpha = _softmax(np.einsum("bth,btnh->btn", Q, K))
    o = np.einsum("btn,btnh->bth", alpha, V)
    if c["value"] and not c["value_before_softmax"]:
        o = linear(o, fw.v_w, None)
    if not c["residual_before"]:
        o = o + r
    y = layer_norm(o + x, lw, lb, ref.eps) if last.original_ln_after else o
    return y, alpha


def fusion_logits(ref: Reference, input_ids, attention_mask, token_type_ids, fusion, adapters: dict, head,
                  keep=None, dropped=(), alphas: dict | None = None):
    """Logits of a fusion task. `keep` maps (layer, location) -> adapter names (pruned sets); default:
    the fusion's own adapter list everywhere. Layers in `dropped` run plain (AdapterDrop). If `alphas`
    is a dict, it receives (layer, location) -> attention weights [B,T,N]."""
    ids = np.asarray(input_ids, np.int64)
    tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, np.int64)
    mask = np.asarray(attention_mask, np.int64)
    x = ref.embeddings(ids, tt)
    dropped = set(dropped)

    def slot(i, loc, h, xin):
        if i in dropped or (i, loc) not in fusion.slots:
            return ref.slot(i, loc, h, xin)
        names = (keep or {}).get((i, loc), fusion.adapter_names)
        y, alpha = fusion_slot(ref, i, loc, h, xin, fusion, [adapters[n] for n in names])
        if alphas is not None:
            alphas[(i, loc)] = alpha
        return y

    for i in range(ref.ck.num_layers):
        x1 = slot(i, "attention", ref.attention(i, x, mask), x)
        x = slot(i, "ffn", ref.ffn(i, x1), x1)
    return head_logits(x, head)


def mean_fusion_weights(alphas: dict, attention_mask) -> dict:
    """"layer:location" -> per-adapter mean attention weight over the real tokens of all sequences."""
    m = np.asarray(attention_mask, np.float64)[:, :, None]
    return {f"{i}:{loc}": ((a * m).sum((0, 1)) / m.sum()).tolist() for (i, loc), a in sorted(alphas.items())}
