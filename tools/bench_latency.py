"""Latency of small calls: a metadata call (native GetTask, KServe ModelMetadata) and a one-text
native Infer, sequential on one channel, with stock clients (grpcio, tritonclient). Small answers
show whether the server sets TCP_NODELAY: without it each one waits for the client's delayed ACK
(about 40 ms on Linux). Prints a markdown table for docs/benchmarks.md.

    python tools/bench_latency.py --binary target/release/adapterdrop-serve --repo build/test-repo
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapterdrop_tools.served import Server, load_stubs  # noqa: E402


def timed(call, n: int) -> list[float]:
    call()  # warm-up (connection, first tokenizer use)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append((time.perf_counter() - t) * 1000)
    return sorted(out)


def pct(sorted_ms: list[float], p: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, max(0, int(round(p / 100 * len(sorted_ms) + 0.5)) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="target/release/adapterdrop-serve")
    ap.add_argument("--repo", default="build/test-repo")
    ap.add_argument("--task", default="mini-pfeiffer")
    ap.add_argument("-n", type=int, default=200, help="calls per kind")
    args = ap.parse_args()
    import tritonclient.grpc as triton

    pb, pb_grpc = load_stubs()
    server = Server(args.binary, args.repo, extra_env={"ADAPTERDROP__RUNTIME__INTRA_THREADS": "2"})
    try:
        channel = grpc.insecure_channel(server.addr)
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = pb_grpc.InferenceStub(channel)
        kserve = triton.InferenceServerClient(server.addr)
        infer = pb.InferRequest(tasks=[pb.TaskRef(name=args.task)], texts=pb.Texts(texts=["one short text"]))
        rows = {
            "GetTask (native)": timed(lambda: stub.GetTask(pb.GetTaskRequest(name=args.task)), args.n),
            "ModelMetadata (KServe, tritonclient)": timed(lambda: kserve.get_model_metadata(args.task), args.n),
            "Infer, one short text (native)": timed(lambda: stub.Infer(infer), args.n),
        }
    finally:
        server.stop()
    print(f"{args.n} sequential calls each, {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}, binary {args.binary}")
    print()
    print("| call | p50 ms | p90 ms | p99 ms | mean ms |")
    print("|---|---|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {pct(ms, 50):.2f} | {pct(ms, 90):.2f} | {pct(ms, 99):.2f} | {statistics.fmean(ms):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
