"""What makes the segmented pipeline slower than one fused graph? (docs/benchmarks.md, "Compute
floor on a quiet machine".) In Python ORT, on the bench repository's MiniLM graphs (B = 8, T = 128,
2 threads, no spinning), times the served cut (4 graphs per layer, chained through ORT values)
against the fused one-graph model, under the session settings the server could use:

- default: one memory arena per session, SkipLayerNormalization fusion on (what the server did);
- no-skipln: the SkipLayerNormFusion optimizer disabled (its CPU kernel is slow);
- shared-arena: additionally one CPU arena registered on the environment for every session
  (what the server does now, `src/runtime/allocator.rs`).

Each variant runs in a fresh process (the environment arena is process-wide). Run after `make bench` built build/bench-repo:
    .venv/bin/python tools/experiments/segment_floor.py
"""
import subprocess
import sys
import time

import numpy as np

R = "build/bench-repo/backbones/minilm"
FUSED = "build/bench-repo/fused/minilm/model.onnx"
VARIANTS = {"default": (False, False), "no-skipln": (True, False), "shared-arena": (True, True)}


def measure(variant: str) -> None:
    import onnxruntime as ort

    no_skip, shared = VARIANTS[variant]
    if shared:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, None)

    def session(path):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if no_skip:
            so.add_session_config_entry("optimization.disable_specified_optimizers", "SkipLayerNormFusion")
        if shared:
            so.add_session_config_entry("session.use_env_allocators", "1")
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    emb = session(f"{R}/embeddings.onnx")
    layers = [{k: session(f"{R}/layers/{i}/{k}.onnx") for k in ("attention", "attention_slot", "ffn", "ffn_slot")} for i in range(6)]
    fused = session(FUSED)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (8, 128)).astype(np.int64)
    tt, mask = np.zeros_like(ids), np.ones_like(ids)
    ov = ort.OrtValue.ortvalue_from_numpy
    oids, ott, omask = ov(ids), ov(tt), ov(mask)

    def run(s, feed):
        return s.run_with_ort_values(None, feed)[0]

    def segmented():
        x = run(emb, {"input_ids": oids, "token_type_ids": ott})
        for g in layers:
            h = run(g["attention"], {"hidden": x, "attention_mask": omask})
            x = run(g["attention_slot"], {"h": h, "x": x})
            h = run(g["ffn"], {"hidden": x})
            x = run(g["ffn_slot"], {"h": h, "x": x})
        return x

    def one_graph():
        return fused.run_with_ort_values(None, {"input_ids": oids, "token_type_ids": ott, "attention_mask": omask})

    def median_ms(f, n=15):
        f()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)) * 1e3

    ratios = []
    for _ in range(3):
        a, b = median_ms(segmented), median_ms(one_graph)
        ratios.append(a / b)
        print(f"{variant:13s} segmented {a:6.1f} ms  fused {b:6.1f} ms  {a / b:.2f}x", flush=True)
    print(f"{variant:13s} median ratio {float(np.median(ratios)):.2f}x")


def main() -> int:
    if len(sys.argv) > 1:
        measure(sys.argv[1])
        return 0
    for v in VARIANTS:
        subprocess.run([sys.executable, __file__, v], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
