#!/usr/bin/env python3
"""Does attention's reshape branch pay? (docs/benchmarks.md, "Attention without gathers".) One layer
built both ways from the checkpoint (`layer_graph(ck, i)`: a batch without padding reshapes instead
of gathering / scattering in attention; `reshape=False`: always the gather), the same unpadded packed
rows (B rows of T tokens) and banks, ABAB rounds in one process, 1 intra-op thread, the thread's CPU
time; median of the per-round ratios with p10-p90; also checks both give the same bits and times
each session's creation.

    .venv/bin/python tools/experiments/attention_reshape_ab.py [--backbone bert-base-random|minilm]
        [--layer 2] [--b 8] [--t 16] [--rounds 41]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adapterdrop_tools.checkpoint import load_checkpoint, minilm_path  # noqa: E402
from adapterdrop_tools.graphs_layer import layer_graph  # noqa: E402
from bench_slot_rule import case_feeds, cases, session, spread  # noqa: E402
from make_bench_repo import bert_base_checkpoint  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="bert-base-random", choices=("bert-base-random", "minilm"))
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--b", type=int, default=8)
    p.add_argument("--t", type=int, default=16)
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--seed", type=int, default=4321, help="make_bench_repo.py's seed")
    a = p.parse_args()
    path = bert_base_checkpoint(tempfile.mkdtemp(), a.seed) if a.backbone != "minilm" else minilm_path()
    ck = load_checkpoint(path)
    H, ffn = ck.hidden_size, ck.intermediate_size
    t0 = time.perf_counter()
    gather = session(layer_graph(ck, a.layer, reshape=False), 1)
    t1 = time.perf_counter()
    reshape = session(layer_graph(ck, a.layer), 1)
    t2 = time.perf_counter()
    print(f"## {a.backbone} layer {a.layer}, B = {a.b}, T = {a.t} (no padding), {a.rounds} ABAB rounds, CPU time; "
          f"session creation: gather {1e3 * (t1 - t0):.0f} ms, reshape {1e3 * (t2 - t1):.0f} ms\n")
    print("| case | gather ms | reshape ms | reshape / gather | p10-p90 | same bits |\n|---|---|---|---|---|---|")
    for name in ("plain", "pfeiffer"):
        f = case_feeds(H, ffn, a.b, a.t, *cases(H, a.b)[name])
        same = np.array_equal(gather.run(["y"], f)[0], reshape.run(["y"], f)[0])
        cg, cr = [], []
        for _ in range(a.rounds):
            for s, c in ((gather, cg), (reshape, cr)):
                c0 = time.thread_time()
                s.run(["y"], f)
                c.append((time.thread_time() - c0) * 1e3)
        print(f"| {name} | {statistics.median(cg):.2f} | {statistics.median(cr):.2f} | {spread(cr, cg)} | "
              f"{'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
