#!/usr/bin/env python3
"""What ELECTRA's split embeddings (a Stack's invertible adapter before `embeddings_project`, issue 14)
cost, at ELECTRA-small's sizes (vocab 30522, E 128, H 256; random weights), ONNX Runtime only, ABAB
rounds in one process, medians of per-round ratios to `before`:

- before: `embeddings.onnx` as exported before (output `hidden` only);
- plain: the new `embeddings.onnx` as a batch without an invertible adapter runs it (the server's CPU
  session returns both outputs, `hidden` and `embedded`);
- stack: a batch with an invertible adapter: the new graph's `embedded`, then
  `embeddings_project.onnx` on every row (the host NICE step between them is not timed: it is the
  same Rust code as on the other backbones).

Usage: bench_electra_embeddings.py [--b 8] [--t 128] [--rounds 41] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools.checkpoint import Checkpoint  # noqa: E402
from adapterdrop_tools.graphs_backbone import embeddings_graph, embeddings_project_graph  # noqa: E402


def electra_small() -> Checkpoint:
    rng = np.random.default_rng(3)
    V, P, E, H = 30522, 512, 128, 256

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    weights = {"embeddings.word_embeddings.weight": w(V, E), "embeddings.position_embeddings.weight": w(P, E),
               "embeddings.token_type_embeddings.weight": w(2, E), "embeddings.LayerNorm.weight": 1 + w(E),
               "embeddings.LayerNorm.bias": w(E), "embeddings_project.weight": w(H, E), "embeddings_project.bias": w(H)}
    config = {"hidden_size": H, "embedding_size": E, "max_position_embeddings": P, "vocab_size": V, "pad_token_id": 0,
              "layer_norm_eps": 1e-12}
    return Checkpoint(path="electra-small-random", config=config, weights=weights, architecture="electra")


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b", type=int, default=8)
    p.add_argument("--t", type=int, default=128)
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--inner", type=int, default=20, help="runs per timing")
    a = p.parse_args(argv)
    ck = electra_small()
    new = embeddings_graph(ck)
    old = onnx.ModelProto()
    old.CopyFrom(new)
    outputs = [o for o in old.graph.output if o.name == "hidden"]
    del old.graph.output[:]
    old.graph.output.extend(outputs)  # the graph exported before: the same nodes, `hidden` only
    before, after, project = session(old, a.threads), session(new, a.threads), session(embeddings_project_graph(ck), a.threads)
    rng = np.random.default_rng(5)
    feeds = {"input_ids": rng.integers(0, 30522, (a.b, a.t)).astype(np.int64),
             "token_type_ids": np.zeros((a.b, a.t), np.int64)}

    def stack():
        embedded = after.run(["embedded"], feeds)[0]
        return project.run(["hidden"], {"embedded": embedded})[0]

    runs = {"before": lambda: before.run(["hidden"], feeds)[0], "plain": lambda: after.run(None, feeds)[0], "stack": stack}
    assert np.array_equal(runs["before"](), runs["plain"]()) and np.array_equal(runs["before"](), stack())
    times = {k: [] for k in runs}
    for _ in range(a.rounds):
        for k, f in runs.items():
            f()
            t0 = time.perf_counter()
            for _ in range(a.inner):
                f()
            times[k].append((time.perf_counter() - t0) / a.inner)
    base = times["before"]
    print(f"ELECTRA-small embeddings, B={a.b} T={a.t}, {a.threads} thread(s), {a.rounds} rounds x {a.inner} runs;"
          f" before: median {statistics.median(base) * 1e3:.3f} ms (outputs bit-identical in all three)")
    for k in ("plain", "stack"):
        ratios = [x / y for x, y in zip(times[k], base)]
        print(f"{k}/before: median of per-round ratios {statistics.median(ratios):.3f}, "
              f"ratio of medians {statistics.median(times[k]) / statistics.median(base):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
