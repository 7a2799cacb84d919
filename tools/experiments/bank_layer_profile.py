"""Where does one bank task lose to the fused graph? (docs/benchmarks.md, "Adapter banks on
BERT-base".) In Python ORT with the server's CPU session settings (SkipLayerNormFusion off, no
spinning), on one layer of the bench repository's backbone, B rows x T tokens, one task's adapter
in bank row 1 of a 9-row bank:

- layer.onnx (the bank layer graph) vs the plain cut (attention, attention_slot, ffn, ffn_slot);
- layer.onnx with every row on bank row 0 (no adapter) -- the cost of the general slot rule alone;
- ORT's own profile of layer.onnx (enable_profiling): time per operator type, summed over runs.

Run after `make bench` (or `tools/make_bench_repo.py --out build/bench-repo --only bert-base-random --tasks 8`):
    .venv/bin/python tools/experiments/bank_layer_profile.py [--backbone bert-base-random] [--b 8] [--t 32]
"""
import argparse
import collections
import json
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort


def session(path, threads, profile=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repo", default="build/bench-repo")
    p.add_argument("--backbone", default="bert-base-random")
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--b", type=int, default=8)
    p.add_argument("--t", type=int, default=32)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    d = os.path.join(a.repo, "backbones", a.backbone, "layers", str(a.layer))
    h = json.load(open(os.path.join(a.repo, "backbones", a.backbone, "backbone.json")))["hidden_size"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.b, a.t, h)).astype(np.float32)
    mask = np.ones((a.b, a.t), np.int64)
    n, r = 9, h // 16

    def bank(width):
        w = {"down_w": rng.standard_normal((n, h, width)).astype(np.float32) * 0.05,
             "down_b": rng.standard_normal((n, 1, width)).astype(np.float32) * 0.1,
             "up_w": rng.standard_normal((n, width, h)).astype(np.float32) * 0.1,
             "up_b": rng.standard_normal((n, 1, h)).astype(np.float32) * 0.1,
             "rule": np.zeros((n, 1, 11), np.float32)}
        # Pfeiffer: LN before and after, residual h, scale 1, relu; row 0 the plain rule.
        w["rule"][:, 0, :] = [1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0]
        w["rule"][0, 0, :] = [1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0]
        for k in ("down_w", "down_b", "up_w", "up_b"):
            w[k][0] = 0
        return w

    att, ffn = bank(1), bank(r)
    rows = np.arange(a.b, dtype=np.int64)
    feed = {"hidden": x, "attention_mask": mask, "attention_rows": rows, "ffn_rows": rows,
            "attention_index": np.zeros(a.b, np.int64), "ffn_index": np.ones(a.b, np.int64)}
    for k, v in att.items():
        feed[f"attention.{k}"] = v
    for k, v in ffn.items():
        feed[f"ffn.{k}"] = v
    plain_feed = {**feed, "ffn_index": np.zeros(a.b, np.int64)}
    layer = session(os.path.join(d, "layer.onnx"), a.threads)
    segs = {k: session(os.path.join(d, f"{k}.onnx"), a.threads) for k in ("attention", "attention_slot", "ffn", "ffn_slot")}

    def cut():
        h1 = segs["attention"].run(None, {"hidden": x, "attention_mask": mask})[0]
        x1 = segs["attention_slot"].run(None, {"h": h1, "x": x})[0]
        h2 = segs["ffn"].run(None, {"hidden": x1})[0]
        return segs["ffn_slot"].run(None, {"h": h2, "x": x1})[0]

    cases = {"plain cut (4 graphs)": cut, "layer.onnx, adapter row": lambda: layer.run(None, feed),
             "layer.onnx, bank row 0": lambda: layer.run(None, plain_feed)}
    times = collections.defaultdict(list)
    for f in cases.values():
        f()
    for i in range(a.runs):
        for k in (list(cases) if i % 2 == 0 else list(reversed(cases))):
            t0 = time.perf_counter()
            cases[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    base = np.median(times["plain cut (4 graphs)"])
    print(f"{a.backbone} layer {a.layer}, B = {a.b}, T = {a.t}, {a.threads} threads, medians of {a.runs}")
    for k, v in times.items():
        print(f"  {k:28s} {np.median(v):8.2f} ms  {np.median(v) / base:.3f}x")
    prof_dir = tempfile.mkdtemp(prefix="bank-profile-")
    s = session(os.path.join(d, "layer.onnx"), a.threads, profile=os.path.join(prof_dir, "layer"))
    for _ in range(a.runs):
        s.run(None, feed)
    events = json.load(open(s.end_profiling()))
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    print(f"  layer.onnx operator time by type ({a.runs} runs, {total / 1e3 / a.runs:.2f} ms per run in kernels):")
    for op, us in by_op.most_common(12):
        print(f"    {op:22s} {us / 1e3 / a.runs:7.2f} ms/run  {100 * us / total:5.1f}%")


if __name__ == "__main__":
    main()
