#!/usr/bin/env python3
"""Many tasks per replica (issue 12): weights-only registration of N distinct MiniLM Pfeiffer
adapters while the server is under inference load, then the resident memory and a restart with all
of them on disk.

Usage: bench_many_tasks.py [--binary target/release/adapterdrop-serve] [--work build/bench-many]
                           [--tasks 1000] [--load-clients 2] [--keep]

Every task is a distinct seeded random AdapterHub Pfeiffer adapter (rf 16, relu) + 2-label head in
the exact `save_adapter` layout, generated under --work just before it is registered and deleted
right after (the server keeps its own copy; 10,000 tasks are about 10 GiB on disk there, so a second
copy would double that); the registered repository is deleted at the end unless --keep. The server starts on a
repository with the real MiniLM backbone and one exported task `load`; --load-clients threads send
Infer requests (8 texts) to `load` without pause while the N adapters are registered one after the
other through Admin.RegisterTask with `header.adapterhub` (weights-only). Reported: RegisterTask
latency p50/p99/max, failed registrations and failed inference requests, the server's VmRSS before
and after with the per-task slope against the weight bytes of one task, and a restart with the N
tasks on disk (time until the gRPC port listens, until every task is READY, VmRSS then), each
against the issue-12 targets (RSS <= backbone + 1.2x the tasks' weight bytes, start-up <= 20 s,
RegisterTask p50 <= 50 ms and p99 <= 200 ms, nothing failed); exit 1 if any is missed.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import register_task  # noqa: E402
from adapterdrop_tools.adapterhub import load_adapter, load_head  # noqa: E402
from adapterdrop_tools.checkpoint import load_checkpoint, minilm_path  # noqa: E402
from adapterdrop_tools.fixtures import random_adapter  # noqa: E402
from adapterdrop_tools.repository import parse_drop, write_backbone, write_task  # noqa: E402

TEXTS = ["a gripping, beautifully shot film about two brothers", "the plot never comes together", "fine",
         "an overlong, muddled thriller", "one of the best of the year", "it is what it is", "dull", "superb"]


def build(work: str):
    """(template repository with the backbone and the exported task `load`, the checkpoint)."""
    repo = os.path.abspath(os.path.join(work, "repo"))
    ck = load_checkpoint(minilm_path())
    if not os.path.isfile(os.path.join(repo, ".done")):
        write_backbone(ck, repo, "minilm", None, "all-MiniLM-L6-v2", "Apache-2.0", force=True)
        d = random_adapter(os.path.join(work, "load-src"), 7, "load", "pfeiffer", ck.num_layers, ck.hidden_size, 16, "relu",
                           ["a", "b"])
        write_task(repo, "minilm", load_adapter(d, ck.num_layers, ck.hidden_size), load_head(d, ck.hidden_size), ck,
                   "load", 1, parse_drop(ck.num_layers, robust=(0, 0, 6)), "load target", force=True)
        open(os.path.join(repo, ".done"), "w").close()
    return repo, ck


def adapter(src: str, ck, i: int) -> str:
    """Task i's AdapterHub directory (seeded: the same task every run)."""
    return random_adapter(os.path.join(src, f"t{i}"), 100_000 + i, f"t{i}", "pfeiffer", ck.num_layers, ck.hidden_size, 16,
                          "relu", ["neg", "pos"])


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far: a start-up's work, whatever else loads the machine."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(binary: str, repo: str, extra_env: dict | None = None):
    env = {"PATH": os.environ.get("PATH", ""), "ORT_DYLIB_PATH": os.environ["ORT_DYLIB_PATH"], "NO_COLOR": "1",
           "ADAPTERDROP__SERVER__LISTEN": "127.0.0.1:0", "ADAPTERDROP__ADMIN__LISTEN": "127.0.0.1:0",
           "ADAPTERDROP__METRICS__LISTEN": "", "ADAPTERDROP__REPOSITORY__PATH": repo,
           "ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S": "0", "ADAPTERDROP__LOG__LEVEL": "warn,adapterdrop_serve=info", **(extra_env or {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen([binary], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: dict = {"phases": []}

    def read():  # keeps draining the pipe so the server never blocks on logging
        for line in proc.stdout:
            if (m := re.search(r"listening addr=(\S+)", line)) and "addr" not in found:
                found["addr"], found["t"] = m.group(1), time.perf_counter() - t0
            if m := re.search(r"admin service up admin=(\S+)", line):
                found["admin"] = m.group(1)
            if "repository opened" in line:
                found["opened"] = dict(re.findall(r"(\w+_ms)=(\d+)", line))
            if "task registered" in line and (m := re.findall(r"(reserve|validate|publish)_ms=(\d+)", line)):
                found["phases"].append({k: int(v) for k, v in m})
    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 600
    while not ("addr" in found and "admin" in found) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    if "addr" not in found:
        proc.kill()
        raise RuntimeError("server did not start")
    return proc, found


def evict(root: str) -> int:
    """Drops the page cache of every file under `root` (this repository's files only), so the next
    start-up reads them from disk as after a reboot or on a fresh node. Returns the bytes evicted."""
    total = 0
    for d, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                total += os.fstat(fd).st_size
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return total


def restart_only(a) -> int:
    """Start-up timings (listening, every task READY, the server's own phases) on a kept repository."""
    import grpc
    register_task.stubs()  # puts the generated modules on the path
    from adapterdrop.v1 import adapterdrop_pb2 as core
    from adapterdrop.v1 import adapterdrop_pb2_grpc as core_grpc
    repo = os.path.abspath(os.path.join(a.work, "serve"))
    tasks = sum(1 for e in os.scandir(os.path.join(repo, "tasks")) if e.is_dir() and not e.name.startswith("."))
    # --compare-readahead: every round starts once with read-ahead off and once on (order alternating),
    # so the ratio is measured side by side on this shared machine.
    settings = [("default", {})]
    if a.compare_readahead:
        settings = [("readahead off", {"ADAPTERDROP__REPOSITORY__READAHEAD_TASKS": "0"}), ("readahead on", {})]
    times: dict = {label: [] for label, _ in settings}
    cpus: dict = {label: [] for label, _ in settings}
    for r in range(a.rounds):
        for label, extra in (settings if r % 2 == 0 else settings[::-1]):
            evicted = evict(os.path.join(repo, "tasks")) if a.cold else 0
            t0 = time.perf_counter()
            proc, at = start(a.binary, repo, extra)
            listed = core_grpc.InferenceStub(grpc.insecure_channel(at["addr"])).ListTasks(core.ListTasksRequest(), timeout=60).tasks
            ready = sum(1 for x in listed if x.status == core.TASK_STATUS_READY and x.head_type != "embedding")
            ready_s, rss, cpu = time.perf_counter() - t0, rss_mib(proc.pid), cpu_s(proc.pid)
            proc.kill()
            proc.wait()
            times[label].append(ready_s)
            cpus[label].append(cpu)
            print(f"round {r} [{label}]: {tasks} task dirs, {'cold' if a.cold else 'warm'} ({evicted >> 20} MiB evicted): "
                  f"listening {at['t']:.2f} s, {ready} ready at {ready_s:.2f} s (CPU {cpu:.2f} s), RSS {rss:.0f} MiB; load average {os.getloadavg()[0]:.1f}; phases {at.get('opened')}",
                  flush=True)
    for label, ts in times.items():
        print(f"{label}: every task READY in median {statistics.median(ts):.2f} s (min {min(ts):.2f}, max {max(ts):.2f}) "
              f"over {len(ts)} start-ups, CPU median {statistics.median(cpus[label]):.2f} s; target <= 20 s: {'met' if max(ts) <= 20 else 'MISSED'}")
    if a.compare_readahead:
        ratios = [on / off for off, on in zip(times["readahead off"], times["readahead on"])]
        print(f"readahead on / off, per round: {', '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default="target/release/adapterdrop-serve")
    p.add_argument("--work", default="build/bench-many")
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--load-clients", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the registered repository under --work/serve")
    p.add_argument("--restart-only", action="store_true",
                   help="only time start-ups on the repository a --keep run left (--rounds times, no registration)")
    p.add_argument("--cold", action="store_true", help="with --restart-only: evict the task files from the page cache first")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--compare-readahead", action="store_true",
                   help="with --restart-only: each round starts with repository.readahead_tasks = 0 and with the default, side by side")
    a = p.parse_args()
    import grpc

    if a.restart_only:
        return restart_only(a)

    template, ck = build(a.work)
    src = os.path.abspath(os.path.join(a.work, "src"))
    shutil.rmtree(src, ignore_errors=True)
    one = adapter(src, ck, 0)
    weight_bytes = sum(os.path.getsize(os.path.join(one, f)) for f in ("adapter.safetensors", "model_head.safetensors"))
    repo = os.path.abspath(os.path.join(a.work, "serve"))
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(template, repo, symlinks=True)
    pb, pb_grpc = register_task.stubs()
    from adapterdrop.v1 import adapterdrop_pb2 as core
    from adapterdrop.v1 import adapterdrop_pb2_grpc as core_grpc

    proc, at = start(a.binary, repo)
    admin = pb_grpc.AdminStub(grpc.insecure_channel(at["admin"]))
    infer_stub = core_grpc.InferenceStub(grpc.insecure_channel(at["addr"]))
    req = core.InferRequest(tasks=[core.TaskRef(name="load")], texts=core.Texts(texts=TEXTS))
    infer_stub.Infer(req, timeout=60)
    rss0 = rss_mib(proc.pid)
    stop, served, failed_infer, infer_errors = threading.Event(), [0], [0], []

    def load():
        while not stop.is_set():
            try:
                infer_stub.Infer(req, timeout=60)
                served[0] += 1
            except grpc.RpcError as e:
                failed_infer[0] += 1
                if len(infer_errors) < 5:
                    infer_errors.append(f"{e.code().name}: {e.details()}")
    clients = [threading.Thread(target=load, daemon=True) for _ in range(a.load_clients)]
    for c in clients:
        c.start()
    time.sleep(1.0)
    drop = core.DropConfig(robust=core.RobustRange(default=0, min=0, max=6))
    lat, failed, gen_s = [], [], 0.0
    t_reg = time.perf_counter()
    for i in range(a.tasks):
        t0 = time.perf_counter()
        d = adapter(src, ck, i)
        gen_s += time.perf_counter() - t0
        files = [(f, os.path.join(d, f)) for f in register_task.ADAPTER_FILES + register_task.HEAD_FILES]
        hub = pb.AdapterHubTask(backbone="minilm", drop=drop)
        t0 = time.perf_counter()
        try:
            admin.RegisterTask(register_task.upload_messages(pb, "", f"t{i}", adapterhub=hub, files=files), timeout=60)
            lat.append(time.perf_counter() - t0)
        except grpc.RpcError as e:
            failed.append(f"t{i}: {e.code().name}: {e.details()}")
        shutil.rmtree(d)
        if i and i % 1000 == 0:
            print(f"{i} registered, RSS {rss_mib(proc.pid):.0f} MiB, {time.perf_counter() - t_reg:.0f} s", file=sys.stderr)
    reg_s = time.perf_counter() - t_reg
    stop.set()
    for c in clients:
        c.join()
    rss1 = rss_mib(proc.pid)
    registered = at
    proc.kill()
    proc.wait()

    per_task = (rss1 - rss0) * 2**20 / max(1, a.tasks)
    t_restart = time.perf_counter()
    proc, at = start(a.binary, repo)
    listen_s = at["t"]
    tasks = core_grpc.InferenceStub(grpc.insecure_channel(at["addr"])).ListTasks(core.ListTasksRequest(), timeout=60).tasks
    ready = sum(1 for x in tasks if x.status == core.TASK_STATUS_READY and x.head_type != "embedding")
    ready_s = time.perf_counter() - t_restart
    rss2 = rss_mib(proc.pid)
    proc.kill()
    proc.wait()
    if not a.keep:
        shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    ms = sorted(x * 1000 for x in lat)
    q = (lambda f: ms[min(len(ms) - 1, int(f * len(ms)))]) if ms else (lambda f: float("nan"))
    print(f"| tasks | RegisterTask p50 / p99 / max (ms) | failed registrations | Infer served / failed during registration "
          f"| RSS before / after (MiB) | per task (MiB) | weights per task (MiB) | restart: listening (s) / ready / RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {a.tasks} | {q(0.5):.1f} / {q(0.99):.1f} / {ms[-1] if ms else float('nan'):.1f} | {len(failed)} "
          f"| {served[0]} / {failed_infer[0]} in {reg_s:.1f} s | {rss0:.0f} / {rss1:.0f} | {per_task / 2**20:.3f} "
          f"| {weight_bytes / 2**20:.3f} | {listen_s:.2f} / {ready} / {rss2:.0f} |")
    print(f"(restart: {ready_s:.1f} s until ListTasks answered; adapters generated in {gen_s:.1f} s of the registration loop)",
          file=sys.stderr)
    print(f"restart phases (server log `repository opened`, ms): {at.get('opened')}", file=sys.stderr)
    if len(lat) >= 20:
        tenth = len(lat) // 10
        first, last = (statistics.median(x * 1000 for x in part) for part in (lat[:tenth], lat[-tenth:]))
        print(f"RegisterTask median, first / last {tenth} registrations: {first:.1f} / {last:.1f} ms", file=sys.stderr)
        phases = registered["phases"]
        for k in ("reserve", "validate", "publish"):
            if len(phases) >= 20:
                part = [p.get(k, 0) for p in phases]
                print(f"  server {k}_ms median, first / last {tenth}: {statistics.median(part[:tenth]):.0f} / "
                      f"{statistics.median(part[-tenth:]):.0f}", file=sys.stderr)
    for f in failed[:5]:
        print("failed:", f, file=sys.stderr)
    for f in infer_errors:
        print("failed Infer:", f, file=sys.stderr)
    budget = rss0 + 1.2 * a.tasks * weight_bytes / 2**20
    checks = [(f"RSS after registration {rss1:.0f} MiB <= backbone {rss0:.0f} + 1.2 x {a.tasks} x weights = {budget:.0f} MiB",
               rss1 <= budget),
              (f"RSS after restart {rss2:.0f} MiB <= {budget:.0f} MiB", rss2 <= budget),
              (f"start-up {listen_s:.1f} s <= 20 s (listening), {ready} of {a.tasks + 1} tasks ready",
               listen_s <= 20 and ready == a.tasks + 1),
              (f"RegisterTask p50 {q(0.5):.1f} ms <= 50, p99 {q(0.99):.1f} ms <= 200", q(0.5) <= 50 and q(0.99) <= 200),
              (f"failed: {len(failed)} registrations, {failed_infer[0]} Infer requests", not failed and not failed_infer[0])]
    for text, ok in checks:
        print(f"{'met   ' if ok else 'MISSED'} {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
