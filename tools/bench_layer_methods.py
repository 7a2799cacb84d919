#!/usr/bin/env python3
"""What the methods bank and the `parallel` rule column (issue 14) cost a batch that uses none of
them: one MiniLM `layer.onnx` of a repository exported before them against the same layer exported
now, the same rows, every row plain (bank row 0), ABAB rounds in one process, medians.

Usage: bench_layer_methods.py --before REPO --after REPO [--backbone minilm] [--layer 2] [--b 8] [--t 64]
       [--rounds 15] [--threads 1] [--lora-rows 0]
`--before`: a repository built by the tools of the commit before (e.g. `git archive w-packing tools
tests/fixtures/adapterhub-tiny | tar -x -C /tmp/old && cd /tmp/old && python tools/make_test_repo.py
--out /tmp/old-repo --with-minilm`); `--after`: `make test-repo`. Rows are packed, T tokens each. `--lora-rows N` also times the new
layer with N distinct LoRA (r = 8, all five projections) rows in the bank, every row using one of them.
`--stack-rows N` also times the new layer with N Pfeiffer rows (r = H / 16) at the FFN slot, every row
using one, without and with a Stack lower adapter (same width) on those rows: what a stack adds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools.adapterhub import Adapter, SlotWeights  # noqa: E402
from adapterdrop_tools.graphs_layer import (K as RULE_K, attention_maps, bank, methods_maps, no_stack_rows,  # noqa: E402
                                            pack_maps, plain_rule_row, stack_bank)
from adapterdrop_tools.graphs_methods import methods_bank, target_dims  # noqa: E402


def session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], disabled_optimizers=["SkipLayerNormFusion"])


def feeds(sess: ort.InferenceSession, B: int, T: int, H: int, ffn: int, lora_rows: int, adapter_rows: int = 0,
          stacked: bool = False) -> dict:
    """Packed rows of T tokens each, every slot on bank row 0; methods rows as `lora_rows` says."""
    rng = np.random.default_rng(5)
    lens, rows = [T] * B, list(range(B))
    f = {"hidden": rng.standard_normal((B * T, H)).astype(np.float32),
         **attention_maps(lens, np.ones((B, T), np.int64))}
    for loc in ("attention", "ffn"):
        f.update({f"{loc}_{k}": v for k, v in pack_maps(lens, rows, [0] * B).items()})
    names = {i.name for i in sess.get_inputs()}
    k = RULE_K if "methods_index" in names else RULE_K - 1  # the `parallel` column is new
    for loc in ("attention", "ffn"):
        rule = np.zeros((8, 1, k), np.float32)
        rule[0, 0] = plain_rule_row()[:k]
        f.update({f"{loc}.down_w": np.zeros((8, H, 1), np.float32), f"{loc}.down_b": np.zeros((8, 1, 1), np.float32),
                  f"{loc}.up_w": np.zeros((8, 1, H), np.float32), f"{loc}.up_b": np.zeros((8, 1, H), np.float32),
                  f"{loc}.rule": rule})
    if "methods_index" in names:
        entries = []
        for _ in range(lora_rows):
            entries.append({t: {"lora_a": rng.standard_normal((i, 8)).astype(np.float32) * 0.1,
                                "lora_b": rng.standard_normal((8, o)).astype(np.float32) * 0.1}
                            for t, (i, o) in target_dims(H, ffn).items()})
        f.update(methods_bank(entries, H, ffn))
        f.update(methods_maps(lens, [(r % lora_rows + 1) if lora_rows else 0 for r in rows], rows))
    f.update(no_stack_rows(f, H))  # the Stack banks (a layer exported before them has no such inputs)
    if adapter_rows:
        f.update(adapter_banks(rng, H, B, T, adapter_rows, stacked))
    return {k: v for k, v in f.items() if k in names}


def adapter_banks(rng, H: int, B: int, T: int, n: int, stacked: bool) -> dict:
    """FFN bank with `n` random Pfeiffer rows (r = H / 16), row j of the batch on bank row j % n + 1;
    with `stacked`, a lower adapter of the same shape in the FFN stack bank at those rows."""
    r = max(1, H // 16)

    def entries():
        out = []
        for k in range(n):
            a = Adapter(name=f"b{k}", method="seq_bn", hidden_size=H, non_linearity="relu", non_linearity_name="relu",
                        reduction_factor=16, original_ln_before=True, original_ln_after=True, residual_before_ln=True,
                        scaling=1.0, leave_out=[], locations=("ffn",), slots={})
            w = SlotWeights(*(rng.standard_normal(sh).astype(np.float32) * 0.1 for sh in ((r, H), (r,), (H, r), (H,))))
            out.append((a, w))
        return out

    f = {f"ffn.{k}": v for k, v in bank(entries(), H).items()}
    f.update({f"ffn.stack.{k}": v for k, v in (stack_bank(entries(), H) if stacked else stack_bank([None] * n, H)).items()})
    lens = [T] * B
    f.update({f"ffn_{k}": v for k, v in pack_maps(lens, range(B), [j % n + 1 for j in range(B)]).items()})
    return f


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True)
    p.add_argument("--after", required=True)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--b", type=int, default=8)
    p.add_argument("--t", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lora-rows", type=int, default=0)
    p.add_argument("--stack-rows", type=int, default=0)
    a = p.parse_args(argv)
    cases = {}
    runs = [("before", a.before, 0, 0, False), ("after", a.after, 0, 0, False)]
    if a.lora_rows:
        runs.append(("after, LoRA rows", a.after, a.lora_rows, 0, False))
    if a.stack_rows:
        runs += [("after, Pfeiffer rows", a.after, 0, a.stack_rows, False),
                 ("after, Pfeiffer rows + Stack", a.after, 0, a.stack_rows, True)]
    for label, repo, lora, rows, stacked in runs:
        d = os.path.join(repo, "backbones", a.backbone)
        m = json.load(open(os.path.join(d, "backbone.json")))
        s = session(os.path.join(d, "layers", str(a.layer), "layer.onnx"), a.threads)
        cases[label] = (s, feeds(s, a.b, a.t, m["hidden_size"], m["intermediate_size"], lora, rows, stacked))
    times = {k: [] for k in cases}
    for s, f in cases.values():  # warm-up
        s.run(["y"], f)
    for _ in range(a.rounds):
        for k, (s, f) in cases.items():
            t0 = time.perf_counter()
            s.run(["y"], f)
            times[k].append((time.perf_counter() - t0) * 1e3)
    base = statistics.median(times["before"])
    print(f"## layer.onnx, {a.backbone} layer {a.layer}, B = {a.b}, T = {a.t}, {a.threads} thread(s), "
          f"medians of {a.rounds} ABAB rounds\n")
    print("| graph | ms | / before (medians) | / before (median of per-round ratios) |\n|---|---|---|---|")
    for k, v in times.items():
        paired = statistics.median(x / y for x, y in zip(v, times["before"]))
        print(f"| {k} | {statistics.median(v):.2f} | {statistics.median(v) / base:.3f} | {paired:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
