"""Where does one bank task lose to the fused single graph? (docs/benchmarks.md, "One task vs the
fused graph on BERT-base".) In Python ORT with the server's CPU session options (all optimizations
but SkipLayerNormFusion, no spinning, 1 intra-op thread), on the bench repository's backbone:

- the bank path's graphs (embeddings.onnx, then every `layers/<i>/layer.onnx` on packed tokens, one
  Pfeiffer task `<prefix>-00` in bank row 1 of its FFN slots) against the fused one-graph plain model
  (`fused/<backbone>/model.onnx`, `tools/make_bench_repo.py`), same B x T rows, ABAB rounds, the
  thread's CPU time, median of the per-round ratios;
- ORT's own profile of both (enable_profiling): kernel time per operator type, summed over runs;
- with `--optimized DIR`: the optimized models ORT made of both (`optimized_model_filepath`) and
  their operator counts (subgraphs included), to compare the fusions ORT applied.

Run after `tools/make_bench_repo.py --out build/bench-base --only bert-base-random --tasks 8 --fusion 0`:
    PYTHONPATH=tools .venv/bin/python tools/experiments/one_task_profile.py [--repo build/bench-base] [--b 8] [--t 16]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adapterdrop_tools.adapterhub import load_adapter  # noqa: E402
from adapterdrop_tools.graphs_layer import attention_maps, bank, methods_maps, no_stack_rows, pack_maps  # noqa: E402
from adapterdrop_tools.graphs_methods import methods_bank  # noqa: E402

PREFIX = {"bert-base-random": "base-pf", "minilm": "mini-pf"}


def session(path: str, threads: int, profile: str | None = None, optimized: str | None = None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], disabled_optimizers=["SkipLayerNormFusion"])


def op_counts(path: str) -> collections.Counter:
    """Operator types of a model, subgraphs (If branches) included."""
    c = collections.Counter()

    def walk(graph):
        for n in graph.node:
            c[n.op_type] += 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
    walk(onnx.load(path, load_external_data=False).graph)
    return c


def kernel_times(path: str) -> collections.Counter:
    """Kernel microseconds per operator type of an ORT profile file."""
    by_op = collections.Counter()
    for e in json.load(open(path)):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    return by_op


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default="build/bench-base")
    p.add_argument("--backbone", default="bert-base-random")
    p.add_argument("--b", type=int, default=8)
    p.add_argument("--t", type=int, default=16)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--optimized", help="write the optimized models here and compare operator counts")
    p.add_argument("--layer-dir", help="take layer graphs from DIR/<i>/layer.onnx instead (an A/B export)")
    a = p.parse_args(argv)
    bbdir = os.path.join(a.repo, "backbones", a.backbone)
    meta = json.load(open(os.path.join(bbdir, "backbone.json")))
    H, L, ffn = meta["hidden_size"], meta["num_layers"], meta["intermediate_size"]
    layer_dir = a.layer_dir or os.path.join(bbdir, "layers")
    ad = load_adapter(os.path.join(a.repo, "tasks", f"{PREFIX[a.backbone]}-00", "1", "adapterhub"), L, H)
    rng = np.random.default_rng(7)
    B, T = a.b, a.t
    ids = rng.integers(1000, 30000, (B, T)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    types, mask = np.zeros((B, T), np.int64), np.ones((B, T), np.int64)
    lens, rows = [T] * B, list(range(B))
    layer_feeds = []
    for i in range(L):
        f = dict(attention_maps(lens, mask))
        for loc in ("attention", "ffn"):
            entry = (ad, ad.slots[(i, loc)]) if (i, loc) in ad.slots else None
            f.update({f"{loc}.{k}": v for k, v in bank([entry], H).items()})
            f.update({f"{loc}_{k}": v for k, v in pack_maps(lens, rows, [0 if entry is None else 1] * B).items()})
        f.update(methods_bank([], H, ffn))
        f.update(methods_maps(lens, [0] * B, rows))
        f.update(no_stack_rows(f, H))
        layer_feeds.append(f)

    def build(profile_dir=None, opt_dir=None):
        prof = (lambda n: os.path.join(profile_dir, n)) if profile_dir else (lambda n: None)
        opt = (lambda n: os.path.join(opt_dir, n + ".onnx")) if opt_dir else (lambda n: None)
        emb = session(os.path.join(bbdir, "embeddings.onnx"), a.threads, prof("emb"), opt("embeddings"))
        layers = [session(os.path.join(layer_dir, str(i), "layer.onnx"), a.threads, prof(f"layer{i}"), opt(f"layer{i}"))
                  for i in range(L)]
        fused = session(os.path.join(a.repo, "fused", a.backbone, "model.onnx"), a.threads, prof("fused"), opt("fused"))

        def banks():
            h = emb.run(["hidden"], {"input_ids": ids, "token_type_ids": types})[0].reshape(B * T, H)
            for s, f in zip(layers, layer_feeds):
                h = s.run(["y"], {"hidden": h, **f})[0]
            return h

        def whole():
            return fused.run(["logits"], {"input_ids": ids, "token_type_ids": types, "attention_mask": mask})[0]
        return emb, layers, fused, banks, whole

    emb, layers, fused, banks, whole = build(opt_dir=a.optimized)
    if a.optimized:
        fc, lc = op_counts(os.path.join(a.optimized, "fused.onnx")), collections.Counter()
        for i in range(L):
            lc += op_counts(os.path.join(a.optimized, f"layer{i}.onnx"))
        lc += op_counts(os.path.join(a.optimized, "embeddings.onnx"))
        print(f"## Optimized operator counts: fused vs embeddings + {L} layer graphs (If branches included)\n")
        print("| op | fused | bank path |\n|---|---|---|")
        for op in sorted(set(fc) | set(lc)):
            print(f"| {op} | {fc[op]} | {lc[op]} |")
        print()
    banks(), whole()
    tb, tf = [], []
    for r in range(a.rounds):
        for fn, acc in ((banks, tb), (whole, tf)) if r % 2 == 0 else ((whole, tf), (banks, tb)):
            c0 = time.thread_time()
            fn()
            acc.append((time.thread_time() - c0) * 1e3)
    ratios = sorted(x / y for x, y in zip(tb, tf))
    print(f"## {a.backbone}, B = {B}, T = {T}, {a.threads} thread(s), {a.rounds} ABAB rounds, thread CPU time\n")
    print(f"bank path (embeddings + {L} layer graphs): {statistics.median(tb):.1f} ms; fused: {statistics.median(tf):.1f} ms;"
          f" ratio **{statistics.median(ratios):.3f}** (p10-p90 {ratios[len(ratios) // 10]:.3f}-{ratios[len(ratios) * 9 // 10]:.3f})\n")

    prof_dir = tempfile.mkdtemp(prefix="one-task-profile-")
    emb, layers, fused, banks, whole = build(profile_dir=prof_dir)
    runs = max(3, a.rounds // 2)
    for _ in range(runs):
        banks(), whole()
    fk = kernel_times(fused.end_profiling())
    bk = kernel_times(emb.end_profiling())
    for s in layers:
        bk += kernel_times(s.end_profiling())
    ft, bt = sum(fk.values()) / 1e3 / runs, sum(bk.values()) / 1e3 / runs
    print(f"## Kernel time per operator type, ms per batch ({runs} runs): fused {ft:.2f}, bank path {bt:.2f}\n")
    print("| op | fused ms | bank path ms | difference ms |\n|---|---|---|---|")
    for op in sorted(set(fk) | set(bk), key=lambda o: -(bk[o] + fk[o])):
        f_, b_ = fk[op] / 1e3 / runs, bk[op] / 1e3 / runs
        print(f"| {op} | {f_:.3f} | {b_:.3f} | {b_ - f_:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
