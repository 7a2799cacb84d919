#!/usr/bin/env python3
"""Resident memory of the server with 1, 8 and 64 loaded tasks on the real MiniLM backbone.

Usage: bench_memory.py [--binary target/release/adapterdrop-serve] [--work build/bench-memory]

Every task is a distinct seeded random Pfeiffer adapter (rf 16, relu) + 2-label head. For each k the
server starts on a repository with the backbone and k tasks, answers one request per task (so
every session has run once and allocated its buffers), and its VmRSS is read from /proc. The cost
per task is the RSS slope between k = 1 and k = 64, compared with the bytes of one task's ONNX
files (its adapter + head weights).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools.adapterhub import load_adapter, load_head  # noqa: E402
from adapterdrop_tools.checkpoint import load_checkpoint, minilm_path  # noqa: E402
from adapterdrop_tools.fixtures import random_adapter  # noqa: E402
from adapterdrop_tools.repository import parse_drop, write_backbone, write_task  # noqa: E402

COUNTS = (1, 8, 64)


def build(work: str) -> str:
    repo = os.path.abspath(os.path.join(work, "repo-all"))
    if os.path.isfile(os.path.join(repo, ".done")):
        return repo
    ck = load_checkpoint(minilm_path())
    write_backbone(ck, repo, "minilm", None, "all-MiniLM-L6-v2", "Apache-2.0", force=True)
    for i in range(max(COUNTS)):
        src = random_adapter(os.path.join(work, "src", f"t{i}"), 1000 + i, f"t{i}", "pfeiffer", ck.num_layers,
                             ck.hidden_size, 16, "relu", ["a", "b"])
        write_task(repo, "minilm", load_adapter(src, ck.num_layers, ck.hidden_size), load_head(src, ck.hidden_size), ck,
                   f"t{i}", 1, parse_drop(ck.num_layers, robust=(0, 0, 6)), "memory benchmark", force=True)
    open(os.path.join(repo, ".done"), "w").close()
    return repo


def subset(work: str, full: str, k: int) -> str:
    """A repository with the first k tasks, by absolute symlinks (no extra disk)."""
    repo = os.path.abspath(os.path.join(work, f"repo-{k}"))
    os.makedirs(os.path.join(repo, "tasks"), exist_ok=True)
    if not os.path.lexists(os.path.join(repo, "backbones")):
        os.symlink(os.path.join(full, "backbones"), os.path.join(repo, "backbones"))
    for i in range(k):
        link = os.path.join(repo, "tasks", f"t{i}")
        if not os.path.lexists(link):
            os.symlink(os.path.join(full, "tasks", f"t{i}"), link)
    return repo


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def start(binary: str, repo: str):
    env = {"PATH": os.environ.get("PATH", ""), "ORT_DYLIB_PATH": os.environ["ORT_DYLIB_PATH"], "NO_COLOR": "1",
           "ADAPTERDROP__SERVER__LISTEN": "127.0.0.1:0", "ADAPTERDROP__METRICS__LISTEN": "", "ADAPTERDROP__ADMIN__LISTEN": "",
           "ADAPTERDROP__REPOSITORY__PATH": repo}
    proc = subprocess.Popen([binary], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = []

    def read():  # keeps draining the pipe so the server never blocks on logging
        for line in proc.stdout:
            m = re.search(r"listening addr=(\S+)", line)
            if m:
                found.append(m.group(1))
    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 120
    while not found and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if not found:
        proc.kill()
        raise RuntimeError("server did not start")
    return proc, found[0]


def measure(binary: str, repo: str, k: int, stubs) -> int:
    import grpc
    proc, addr = start(binary, repo)
    try:
        pb2, pb2_grpc = stubs
        with grpc.insecure_channel(addr) as ch:
            stub = pb2_grpc.InferenceStub(ch)
            for i in range(k):
                req = pb2.InferRequest(tasks=[pb2.TaskRef(name=f"t{i}")], texts=pb2.Texts(texts=["warm up every session"]))
                stub.Infer(req, timeout=30)
        time.sleep(0.5)
        return rss_kib(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def stubs(work: str):
    from grpc_tools import protoc
    out = os.path.abspath(os.path.join(work, "stubs"))
    os.makedirs(out, exist_ok=True)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto")
    protoc.main(["protoc", f"-I{root}", f"--python_out={out}", f"--grpc_python_out={out}",
                 os.path.join(root, "adapterdrop/v1/adapterdrop.proto")])
    sys.path.insert(0, out)
    from adapterdrop.v1 import adapterdrop_pb2, adapterdrop_pb2_grpc  # type: ignore
    return adapterdrop_pb2, adapterdrop_pb2_grpc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default="target/release/adapterdrop-serve")
    p.add_argument("--work", default="build/bench-memory")
    a = p.parse_args()
    full = build(a.work)
    s = stubs(a.work)
    task_dir = os.path.join(full, "tasks", "t0")
    task_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(task_dir) for f in fs)
    rss = {k: measure(a.binary, subset(a.work, full, k), k, s) for k in COUNTS}
    per_task = (rss[64] - rss[1]) * 1024 / 63
    print("| loaded tasks | resident memory (MiB) |")
    print("|---|---|")
    for k in COUNTS:
        print(f"| {k} | {rss[k] / 1024:.1f} |")
    print(f"\nper task (slope 1 -> 64): {per_task / 2**20:.2f} MiB; one task's ONNX files (adapter + head "
          f"weights): {task_bytes / 2**20:.2f} MiB; ratio {per_task / task_bytes:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
