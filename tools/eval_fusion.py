#!/usr/bin/env python3
"""`make eval-fusion`: the pruning curve of the trained AdapterFusion, measured through the server.

Usage: eval_fusion.py [--binary target/release/adapterdrop-serve] [--repo build/eval-fusion-repo]
                      [--json docs/results-fusion.json] [--keep 2,1] [--timing-texts 256]

1. Exports models/trained/sentiment-fusion (+ sentiment-standard, the plain reference) into REPO.
2. Starts the server, sends the sentiment dev split with return_fusion_weights and averages each adapter's
   fusion weight per layer (prune_fusion.collect), ranks globally and writes a pruned task per k
   (`sentiment-fusion-top<k>`, prune_task: same fusion weights and head, fewer adapters).
3. Restarts the server and measures test accuracy at n = 0..L for the full and pruned fusions, and the
   latency at n = 0 of full vs pruned vs the single adapter, side by side in interleaved rounds.
Writes --json, then re-renders docs/results.md/.png from docs/results.json (tools/eval_trained.py) with
the fusion section and the fusion curves added.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools import datasets, trained  # noqa: E402
from adapterdrop_tools.fusion_task import prune_task, rank  # noqa: E402
from adapterdrop_tools.served import ROOT, Server, load_stubs, served_logits  # noqa: E402
from prune_fusion import collect  # noqa: E402

FUSION = "sentiment-fusion"
PLAIN = "sentiment-standard"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{model}, {os.cpu_count()} cores (shared), {platform.system()}"


def channel(srv):
    import grpc
    ch = grpc.insecure_channel(srv.addr)
    grpc.channel_ready_future(ch).result(timeout=30)
    return ch


def timing(stub, pb, names: list, texts: list, batch: int, rounds: int) -> dict:
    """Median ms per batch of `batch` texts at n = 0 for each task, tasks interleaved within each round."""
    per = {n: [] for n in names}
    for name in names:  # warm-up
        stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name=name, drop_first=0)], texts=pb.Texts(texts=texts[:batch])))
    for _ in range(rounds):
        for name in names:
            t0 = time.perf_counter()
            for i in range(0, len(texts), batch):
                stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name=name, drop_first=0)],
                                           texts=pb.Texts(texts=texts[i:i + batch])), timeout=600)
            per[name].append(1000 * (time.perf_counter() - t0) / ((len(texts) + batch - 1) // batch))
    return {n: statistics.median(v) for n, v in per.items()}


def run(a) -> dict:
    cfg = trained.fusion_runs()[FUSION]
    L = 6
    ns = list(range(L + 1))
    pb, pb_grpc = load_stubs()
    trained.build_repo(a.repo, "eval", only=[FUSION, PLAIN])
    dev = datasets.check_recorded("sentiment")["dev"]
    test = datasets.check_recorded("sentiment")["test"]
    with Server(a.binary, a.repo) as srv:
        ch = channel(srv)
        weights = collect(pb_grpc.InferenceStub(ch), pb, FUSION, 1, 0, dev.texts, 32, 600)
        ch.close()
    slots = sorted(weights, key=lambda k: int(k.split(":")[0]))
    mean = {ad: float(np.mean([weights[k][ad] for k in slots])) for ad in cfg["fused_adapters"]}
    ranking = sorted(mean, key=lambda ad: -mean[ad])
    tasks = [(FUSION, list(cfg["fused_adapters"]))]
    for k in a.keep:
        keep = rank(weights, k, "global")
        name = f"{FUSION}-top{k}"
        prune_task(a.repo, FUSION, 1, keep, name, 1,
                   {"mode": "global", "k": k, "inputs": len(dev.texts), "drop_first": 0, "average_weights": weights},
                   force=True)
        tasks.append((name, keep[slots[0]]))
        print(f"{name}: keeps {keep[slots[0]]}", flush=True)
    out = {"source": FUSION, "fused": cfg["fused_adapters"], "num_layers": L, "rank_inputs": len(dev.texts),
           "train": f"{cfg['train_examples']} examples, {cfg['epochs']} epoch, batch {cfg['batch_size']}, "
                    f"AdamW lr {cfg['lr']}; dev accuracy {100 * cfg['dev_accuracy']['0']:.1f} % at n = 0",
           "slots": slots, "weights": weights, "mean_weight": mean, "ranking": ranking, "tasks": [],
           "server": os.path.relpath(os.path.abspath(a.binary), ROOT)}
    with Server(a.binary, a.repo) as srv:
        ch = channel(srv)
        stub = pb_grpc.InferenceStub(ch)
        for name, kept in tasks:
            t0 = time.time()
            got = served_logits(stub, pb, name, test.texts, ns)
            acc = {str(n): float((got[n].argmax(-1) == np.array(test.labels)).mean()) for n in ns}
            out["tasks"].append({"name": name, "kept": kept, "test_size": len(test.labels), "accuracy": acc})
            print(f"{name}: " + " ".join(f"{n}:{v:.3f}" for n, v in acc.items()) + f" ({time.time() - t0:.0f}s)", flush=True)
        if a.timing_texts:
            names = [t[0] for t in tasks] + [PLAIN]
            ms = timing(stub, pb, names, test.texts[:a.timing_texts], 32, a.rounds)
            out["timing"] = {"ms": ms, "base": FUSION, "texts": a.timing_texts, "batch": 32, "rounds": a.rounds,
                             "binary": out["server"], "machine": machine()}
            print("ms per batch: " + ", ".join(f"{n} {v:.1f}" for n, v in ms.items()), flush=True)
        ch.close()
    return out


def render(data: dict, results_json: str, md: str, png: str) -> None:
    """Re-render docs/results.md and .png from the committed raw numbers, now with the fusion section."""
    import eval_trained
    with open(results_json, encoding="utf-8") as f:
        results = json.load(f)
    torch_path = os.path.join(trained.TRAINED_DIR, "pytorch_accuracy.json")
    torch_acc = json.load(open(torch_path, encoding="utf-8")) if os.path.isfile(torch_path) else {}
    eval_trained.write_plot(results, png, data)
    eval_trained.write_markdown(results, torch_acc, md, os.path.relpath(png, os.path.dirname(md)), data)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "adapterdrop-serve"))
    p.add_argument("--repo", default=str(ROOT / "build" / "eval-fusion-repo"))
    p.add_argument("--json", default=str(ROOT / "docs" / "results-fusion.json"))
    p.add_argument("--keep", default="2,1", help="pruned sizes (global sets)")
    p.add_argument("--timing-texts", type=int, default=256, help="0: no latency measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--render-only", action="store_true", help="re-render results.md from --json")
    a = p.parse_args(argv)
    a.keep = [int(k) for k in a.keep.split(",")]
    if a.render_only:
        with open(a.json, encoding="utf-8") as f:
            data = json.load(f)
    else:
        data = run(a)
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
    render(data, str(ROOT / "docs" / "results.json"), str(ROOT / "docs" / "results.md"), str(ROOT / "docs" / "results.png"))
    print(f"wrote {a.json}, docs/results.md, docs/results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
