"""Triton's perf_analyzer against the KServe v2 endpoint: a bounded load run with zero errors.

Starts the server (release build) on a free loopback port, runs perf_analyzer (installed by
`make perf-analyzer` into build/perf) for each model and concurrency, checks through
ModelStatistics that the server counted no failed request, and prints a markdown table for
docs/benchmarks.md.

    python tools/bench_kserve.py --binary target/release/adapterdrop-serve --repo build/test-repo
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "a gripping, beautifully shot film with a script that never lets go",
    "the plot never comes together and the pacing drags in the middle",
    "short",
    "stocks rallied after the central bank held rates steady on thursday",
    "the striker scored twice in the second half to seal the title",
    "the new phone ships with a faster chip and a brighter display",
]


def input_data(path: Path, batch: int = 1) -> Path:
    """perf_analyzer --input-data: TEXT only (the other inputs are optional and not sent)."""
    steps = [{"TEXT": {"content": [TEXTS[(i + j) % len(TEXTS)] for j in range(batch)], "shape": [1]}} for i in range(len(TEXTS))]
    path.write_text(json.dumps({"data": steps}), encoding="utf-8")
    return path


def run_perf_analyzer(perf_dir: Path, addr: str, model: str, data: Path, concurrency: int, extra: list[str], csv_path: Path, timeout_s: float) -> dict:
    """One perf_analyzer run; returns its CSV row. Raises on a non-zero exit."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(perf_dir / "lib"))
    cmd = [
        str(perf_dir / "bin" / "perf_analyzer"), "-m", model, "-u", addr, "-i", "grpc",
        "--input-data", str(data), "--concurrency-range", str(concurrency), "-f", str(csv_path), *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"perf_analyzer exited {proc.returncode}: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return rows[0] | {"command": " ".join(cmd), "stdout": proc.stdout}


def server_counts(addr: str, model: str, executions: bool = False) -> tuple[int, ...]:
    """(success, fail) request counts of the model (all versions), from ModelStatistics;
    with `executions`, also (inference_count, execution_count)."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(addr) as c:
        stats = c.get_inference_statistics(model).model_stats
    counts = (sum(s.inference_stats.success.count for s in stats), sum(s.inference_stats.fail.count for s in stats))
    if executions:
        counts += (sum(s.inference_count for s in stats), sum(s.execution_count for s in stats))
    return counts


def start_server(binary: Path, repo: Path, threads: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    env.update({
        "ADAPTERDROP__SERVER__LISTEN": "127.0.0.1:0",
        "ADAPTERDROP__METRICS__LISTEN": "127.0.0.1:0",
        "ADAPTERDROP__ADMIN__LISTEN": "",
        "ADAPTERDROP__REPOSITORY__PATH": str(repo),
        "ADAPTERDROP__RUNTIME__INTRA_THREADS": str(threads),
        "ADAPTERDROP__LOG__LEVEL": "warn,adapterdrop_serve::server=info",
        "NO_COLOR": "1",
    })
    proc = subprocess.Popen([str(binary)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if "listening" in line and "addr=" in line:
            return proc, line.split("addr=", 1)[1].split()[0]
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("server did not start")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", type=Path, default=ROOT / "target" / "release" / "adapterdrop-serve")
    ap.add_argument("--repo", type=Path, default=ROOT / "build" / "test-repo")
    ap.add_argument("--perf-dir", type=Path, default=ROOT / "build" / "perf")
    ap.add_argument("--models", default="sent,mini-pfeiffer")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--batch", type=int, default=1, help="sequences per request (perf_analyzer -b)")
    ap.add_argument("--interval-ms", type=int, default=3000, help="perf_analyzer measurement window")
    ap.add_argument("--threads", type=int, default=0, help="runtime.intra_threads (0 = one per core)")
    ap.add_argument("--stability", type=int, default=25, help="perf_analyzer --stability-percentage (its default, 10, rarely settles on a shared machine)")
    ap.add_argument("--max-trials", type=int, default=10)
    args = ap.parse_args()

    proc, addr = start_server(args.binary, args.repo, args.threads)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = input_data(Path(tmp) / "data.json", 1)
            for model in args.models.split(","):
                for conc in [int(c) for c in args.concurrency.split(",")]:
                    ok0, fail0, inf0, ex0 = server_counts(addr, model, True)
                    extra = ["-b", str(args.batch), "--measurement-interval", str(args.interval_ms), "--max-trials", str(args.max_trials),
                             "--stability-percentage", str(args.stability)]
                    row = run_perf_analyzer(args.perf_dir, addr, model, data, conc, extra, Path(tmp) / "out.csv", 600)
                    ok1, fail1, inf1, ex1 = server_counts(addr, model, True)
                    if fail1 != fail0 or ok1 == ok0:
                        raise RuntimeError(f"{model}: server counted {fail1 - fail0} failed and {ok1 - ok0} successful requests")
                    rows.append((model, conc, row, ok1 - ok0, (inf1 - inf0) / max(1, ex1 - ex0)))
                    print(f"{model} c={conc}: {float(row['Inferences/Second']):.1f} infer/s, p50 {int(row['p50 latency']) / 1000:.2f} ms, "
                          f"p99 {int(row['p99 latency']) / 1000:.2f} ms, {ok1 - ok0} requests, 0 failed", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"\nMachine: {cpu_model()}, {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.1f} at the end; batch {args.batch}, window {args.interval_ms} ms, stability {args.stability}%; "
          f"server {args.binary.name} on {args.repo.name}, intra_threads {args.threads}\n")
    print("| model | concurrency | infer/s | infer/s vs first concurrency | p50 ms | p90 ms | p99 ms | avg ms | server requests | failed | rows per execution |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    first = {}
    for model, conc, r, n, per_exec in rows:
        first.setdefault(model, float(r["Inferences/Second"]))
        ms = lambda k: f"{int(r[k]) / 1000:.2f}"  # noqa: E731
        avg = sum(int(r[k]) for k in ("Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
                                       "Server Compute Infer", "Server Compute Output", "Client Recv"))
        print(f"| {model} | {conc} | {float(r['Inferences/Second']):.1f} | {float(r['Inferences/Second']) / first[model]:.2f}x | "
              f"{ms('p50 latency')} | {ms('p90 latency')} | {ms('p99 latency')} | {avg / 1000:.2f} | {n} | 0 | {per_exec:.2f} |")
    print(f"\nCommand (per row): {rows[-1][2]['command'] if rows else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
