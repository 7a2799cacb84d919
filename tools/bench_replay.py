#!/usr/bin/env python3
"""Real traffic replay (issue 15): today's engine against packed tokens + length-aware batching,
side by side in one run, on the real test texts of the three trained tasks.

    python tools/bench_replay.py [--binary target/release/adapterdrop-serve] [--repo models/default] [--quick]

Two servers of the same binary are started on the same repository, with ONNX Runtime on 2 intra-op
threads each:
  A "today":        batching.length_wait_ms = 0 (first come, first served), engine.packing = false
  B "packed+length": batching.length_wait_ms = 50, engine.packing = true
`engine.packing` is passed only when the binary knows the key (a binary from before packed tokens
refuses unknown keys at start-up); without it the run compares FIFO with length-aware batching.

Workloads, each request one text and a task drawn at random (seeded) from the three trained robust
tasks (served at their default drop depth):
  replay     the 1,800 test texts of sentiment, topic and subjectivity (tools/adapterdrop_tools/
             datasets.py), arrival order shuffled with a fixed seed
  long-tail  90% test texts under 32 tokens, 10% texts of 256-512 tokens made by joining test texts
--length-only keeps B padded too (length-aware batching alone against FIFO).
Runs per workload: closed loop with 8 and with 32 clients, then an open loop (Poisson arrivals) at
80% of A's capacity as measured by its 32-client run. A and B are measured in turns (A B, then
B A in the next round), never at once. Reported per run: real tokens per second (the tokens of the
requests answered), p50/p99 latency, and the padding efficiency of the batches that ran
(adapterdrop_batch_tokens: real / computed outside attention, real / attention inside), then B/A.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapterdrop_tools import datasets  # noqa: E402
from adapterdrop_tools.served import Server, load_stubs  # noqa: E402

TASKS = ("sentiment-robust", "topic-robust", "subjectivity-robust")
SEED = 15
LENGTH_WAIT_MS = 50


def test_texts() -> list[str]:
    texts = []
    for task in datasets.TASKS:
        texts.extend(datasets.load_splits(task)["test"].texts)
    return texts


def long_tail(texts: list[str], tokenizer, n: int, rng: random.Random) -> list[str]:
    """n texts: 90% real texts under 32 tokens, 10% real texts joined to 256-512 tokens."""
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts)]
    short = [t for t, k in zip(texts, lengths) if k < 32]
    out = []
    for i in range(n):
        if i % 10 != 9:
            out.append(rng.choice(short))
            continue
        target = rng.randint(256, 512)
        words: list[str] = []
        while len(tokenizer.encode(" ".join(words)).ids) < target:
            words.extend(rng.choice(texts).split())
        # Cut back to the target (special tokens counted).
        while len(tokenizer.encode(" ".join(words)).ids) > target:
            words.pop()
        out.append(" ".join(words))
    rng.shuffle(out)
    return out


def scrape(metrics_addr: str) -> dict:
    """adapterdrop_batch_tokens_sum by kind."""
    body = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10).read().decode()
    out = {}
    for line in body.splitlines():
        if line.startswith("adapterdrop_batch_tokens_sum{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            out[kind] = float(line.rsplit(" ", 1)[1])
    return out


class Workload:
    """An endless, seeded request stream: (text, task) in a fixed order."""

    def __init__(self, texts: list[str], seed: int):
        rng = random.Random(seed)
        self.items = [(t, rng.choice(TASKS)) for t in texts]
        rng.shuffle(self.items)
        self.at = 0
        self.lock = threading.Lock()

    def next(self):
        with self.lock:
            item = self.items[self.at % len(self.items)]
            self.at += 1
            return item


def request(pb, text: str, task: str):
    return pb.InferRequest(tasks=[pb.TaskRef(name=task)], texts=pb.Texts(texts=[text]), truncate=True)


def measure(server, stub, pb, work: Workload, seconds: float, clients: int = 0, rate: float = 0.0) -> dict:
    """Closed loop with `clients` threads, or open loop at `rate` requests/s (Poisson arrivals)."""
    lat, tokens, errors = [], [], []
    lock = threading.Lock()
    before = scrape(server.metrics_addr)
    start = time.perf_counter()
    stop = start + seconds

    def done(t0: float, resp=None, err=None):
        with lock:
            if err is not None:
                errors.append(str(err))
            else:
                lat.append(time.perf_counter() - t0)
                tokens.append(sum(resp.num_tokens))

    if clients:
        def client():
            while time.perf_counter() < stop:
                text, task = work.next()
                t0 = time.perf_counter()
                try:
                    done(t0, stub.Infer(request(pb, text, task), timeout=120))
                except grpc.RpcError as e:
                    done(t0, err=e.code())

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        rng = random.Random(SEED)
        pending = []
        at = start
        while at < stop:
            at += rng.expovariate(rate)
            time.sleep(max(0.0, at - time.perf_counter()))
            text, task = work.next()
            t0 = time.perf_counter()
            fut = stub.Infer.future(request(pb, text, task), timeout=120)

            def cb(f, t0=t0):
                try:
                    done(t0, f.result())
                except grpc.RpcError as e:
                    done(t0, err=e.code())

            fut.add_done_callback(cb)
            pending.append(fut)
        for f in pending:
            try:
                f.result()
            except grpc.RpcError:
                pass
    wall = time.perf_counter() - start
    after = scrape(server.metrics_addr)
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("real", "computed", "attention")}
    lat.sort()
    return {
        "requests": len(lat), "errors": len(errors), "error_codes": sorted(set(errors)), "wall": wall, "rps": len(lat) / wall,
        "tokens_per_s": sum(tokens) / wall,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else float("nan"),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "eff": d["real"] / d["computed"] if d["computed"] else float("nan"),
        "eff_attention": d["real"] / d["attention"] if d["attention"] else float("nan"),
    }


def start(binary: str, repo: str, label: str, env: dict) -> Server:
    # No admission bound by estimated wait: the closed loops bound the queue, and every request counts.
    base = {"ADAPTERDROP__RUNTIME__INTRA_THREADS": "2", "ADAPTERDROP__LOG__LEVEL": "warn,adapterdrop_serve=info",
            "ADAPTERDROP__BATCHING__MAX_QUEUE_WAIT_MS": "0"}
    server = Server(binary, repo, extra_env={**base, **env})
    print(f"  {label}: {server.addr} {env}", flush=True)
    return server


def knows_packing(binary: str, repo: str) -> bool:
    """Whether the binary has `engine.packing` (an older one stops on the unknown key)."""
    try:
        Server(binary, repo, timeout_s=120, extra_env={"ADAPTERDROP__ENGINE__PACKING": "false"}).stop()
        return True
    except RuntimeError as e:
        if "packing" in str(e):
            return False
        raise


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="target/release/adapterdrop-serve")
    ap.add_argument("--repo", default="models/default")
    ap.add_argument("--quick", action="store_true", help="one round of 4 s runs instead of two rounds of 10 s")
    ap.add_argument("--seconds", type=float, default=None, help="length of one measured run")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of A B (alternating order)")
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    ap.add_argument("--length-only", action="store_true",
                    help="B keeps engine.packing = false: length-aware batching alone against FIFO")
    args = ap.parse_args()
    seconds = args.seconds or (4.0 if args.quick else 10.0)
    rounds = args.rounds or (1 if args.quick else 2)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(args.repo) / "backbones" / "minilm" / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    texts = test_texts()
    workloads = {"replay": texts, "long-tail": long_tail(texts, tokenizer, 2000, random.Random(SEED))}
    packing = knows_packing(args.binary, args.repo)
    a_env = {"ADAPTERDROP__BATCHING__LENGTH_WAIT_MS": "0"}
    b_env = {"ADAPTERDROP__BATCHING__LENGTH_WAIT_MS": str(LENGTH_WAIT_MS)}
    if packing:
        a_env["ADAPTERDROP__ENGINE__PACKING"] = "false"
        b_env["ADAPTERDROP__ENGINE__PACKING"] = "false" if args.length_only else "true"
    if not packing:
        b_name = "length-aware (no engine.packing in this binary)"
    else:
        b_name = "length-aware, padded (engine.packing = false)" if args.length_only else "packed + length-aware"
    print(f"A = today's engine (FIFO, padded), B = {b_name}; {rounds} round(s) of {seconds:.0f} s runs", flush=True)
    pb, pb_grpc = load_stubs()
    servers = {"A": start(args.binary, args.repo, "A", a_env), "B": start(args.binary, args.repo, "B", b_env)}
    rows = []
    try:
        stubs = {}
        for k, s in servers.items():
            ch = grpc.insecure_channel(s.addr, options=[("grpc.max_receive_message_length", 64 << 20)])
            grpc.channel_ready_future(ch).result(timeout=60)
            stubs[k] = pb_grpc.InferenceStub(ch)
            # Warm-up: sessions, arenas and the tokenizer.
            warm = Workload(texts[:64], SEED)
            measure(s, stubs[k], pb, warm, 2.0, clients=8)
        for wname, wtexts in workloads.items():
            capacity = None
            for mode in ("closed 8", "closed 32", "open 80%"):
                runs = {"A": [], "B": []}
                for r in range(rounds):
                    for k in ("A", "B") if r % 2 == 0 else ("B", "A"):
                        work = Workload(wtexts, SEED + r)
                        if mode == "open 80%":
                            res = measure(servers[k], stubs[k], pb, work, seconds, rate=0.8 * capacity)
                        else:
                            res = measure(servers[k], stubs[k], pb, work, seconds, clients=int(mode.split()[1]))
                        runs[k].append(res)
                        print(f"  {wname:9} {mode:9} {k}: {res['requests']} req ({res['errors']} errors {res['error_codes']}), "
                              f"{res['tokens_per_s']:.0f} tok/s, p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, "
                              f"efficiency {res['eff']:.2f} (attention {res['eff_attention']:.2f})", flush=True)
                if mode == "closed 32":
                    capacity = median(runs["A"], "rps")
                rows.append((wname, mode if mode != "open 80%" else f"open {0.8 * capacity:.1f} req/s", runs))
    finally:
        for s in servers.values():
            s.stop()
    md = [
        f"A = today's engine (FIFO batching, padded), B = {b_name}. Medians of {rounds} run(s) of {seconds:.0f} s each, "
        f"A and B in turns. {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| workload | load | real tok/s A | real tok/s B | B/A | p50 ms A | p50 ms B | p99 ms A | p99 ms B | B/A p99 | "
        "efficiency A | efficiency B | attention eff. A | attention eff. B |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for wname, mode, runs in rows:
        a, b = runs["A"], runs["B"]
        ta, tb = median(a, "tokens_per_s"), median(b, "tokens_per_s")
        pa, pbb = median(a, "p99_ms"), median(b, "p99_ms")
        md.append(f"| {wname} | {mode} | {ta:.0f} | {tb:.0f} | {tb / ta:.2f}x | {median(a, 'p50_ms'):.1f} | "
                  f"{median(b, 'p50_ms'):.1f} | {pa:.1f} | {pbb:.1f} | {pbb / pa:.2f}x | {median(a, 'eff'):.2f} | "
                  f"{median(b, 'eff'):.2f} | {median(a, 'eff_attention'):.2f} | {median(b, 'eff_attention'):.2f} |")
    text = "\n".join(md)
    print("\n" + text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    errors = sum(r["errors"] for _, _, runs in rows for k in runs for r in runs[k])
    if errors:
        print(f"{errors} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
