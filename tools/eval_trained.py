#!/usr/bin/env python3
"""`make eval`: accuracy of every trained task at n = 0..L dropped layers, measured through the server.

Usage: eval_trained.py [--binary target/release/adapterdrop-serve] [--repo build/eval-repo]
                       [--out docs/results.md] [--plot docs/results.png]

Exports models/trained/* (runs not yet in --cache) into REPO with every run as robust 0..L (tools/adapterdrop_tools/trained.py,
layout "eval"), starts the server binary on it, sends each task's whole test split over gRPC (one request
per 64 texts, one TaskRef per n, so the shared lower layers run once), and writes the table to --out,
the raw numbers next to it (.json) and the plot to --plot (matplotlib, tools/requirements-eval.txt).
The PyTorch library's accuracy on the same split (models/trained/pytorch_accuracy.json, from
tools/train/golden.py) is shown next to the served numbers.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools import datasets, trained  # noqa: E402
from adapterdrop_tools.served import ROOT, Server, load_stubs, served_logits  # noqa: E402

PAPER = {"specialized": 97.1, "robust": 95.4}  # % of full-adapter performance at n = 5 of 12 (RoBERTa-base, GLUE)
NUM_LAYERS = 6


def _key(run: str, cfg: dict) -> str:
    """Cache key: the exported weights and the test split (accuracy does not depend on anything else)."""
    h = hashlib.sha256()
    for fn in ("adapter.safetensors", "model_head.safetensors", "adapter_config.json", "head_config.json"):
        with open(os.path.join(trained.TRAINED_DIR, run, fn), "rb") as f:
            h.update(f.read())
    h.update(datasets.describe(cfg["task"])["splits"]["test"]["ids_sha256"].encode())
    return h.hexdigest()


def measure(binary: str, repo: str, cache: str, reverse: bool = False, lock: bool = False) -> dict:
    """Accuracy per run at n = 0..L; runs whose weights and test split are unchanged come from `cache`."""
    import grpc
    runs = trained.runs()
    os.makedirs(cache, exist_ok=True)
    results, todo = {}, []
    for run, cfg in runs.items():
        path = os.path.join(cache, run + ".json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if old.get("key") == _key(run, cfg):
                results[run] = old["result"]
                continue
        todo.append(run)
    if reverse:  # a second measuring process can start from the other end
        todo.reverse()
    if todo:
        pb, pb_grpc = load_stubs()
        trained.build_repo(repo, "eval", only=todo)
        ns = list(range(NUM_LAYERS + 1))
        with Server(binary, repo) as srv:
            ch = grpc.insecure_channel(srv.addr)
            grpc.channel_ready_future(ch).result(timeout=30)
            stub = pb_grpc.InferenceStub(ch)
            for run in todo:
                cfg = runs[run]
                done = os.path.join(cache, run + ".json")
                if os.path.isfile(done):  # measured meanwhile by another process
                    with open(done, encoding="utf-8") as f:
                        old = json.load(f)
                    if old.get("key") == _key(run, cfg):
                        results[run] = old["result"]
                        continue
                if lock:  # several measuring processes share the work: one run each at a time
                    try:
                        os.close(os.open(os.path.join(cache, run + ".lock"), os.O_CREAT | os.O_EXCL))
                    except FileExistsError:
                        continue
                test = datasets.check_recorded(cfg["task"])["test"]
                t0 = time.time()
                logits = served_logits(stub, pb, run, test.texts, ns)
                acc = {n: float((logits[n].argmax(-1) == np.array(test.labels)).mean()) for n in ns}
                results[run] = {"task": cfg["task"], "variant": cfg["variant"], "method": cfg["method"],
                                "train_drop": cfg["train_drop"], "test_size": len(test.labels),
                                "accuracy": {str(n): a for n, a in acc.items()},
                                "server": os.path.relpath(os.path.abspath(binary), ROOT)}
                with open(os.path.join(cache, run + ".json"), "w", encoding="utf-8") as f:
                    json.dump({"key": _key(run, cfg), "result": results[run]}, f)
                if lock:
                    os.remove(os.path.join(cache, run + ".lock"))
                print(f"{run}: " + " ".join(f"{n}:{a:.3f}" for n, a in acc.items())
                      + f" ({time.time() - t0:.0f}s)", flush=True)
            ch.close()
    return {run: results[run] for run in runs if run in results}


def ordered(results: dict) -> list:
    """Runs by task, then standard, specialized, robust, other methods last."""
    rank = {"standard": 0, "specialized": 1, "robust": 2}
    return sorted(results.items(), key=lambda kv: (datasets.TASKS.index(kv[1]["task"]),
                                                    kv[1]["method"] != "seq_bn", rank[kv[1]["variant"]]))


def agreement(results: dict, torch_acc: dict) -> str:
    """One sentence comparing served accuracy with the PyTorch library's, computed, not asserted."""
    pairs = [(run, n) for run in results for n in torch_acc.get(run, {}).get("accuracy", {})]
    if not pairs:
        return "No PyTorch accuracy file: run `make golden` with `--accuracy` to compare."
    off = [(run, n) for run, n in pairs if abs(results[run]["accuracy"][n] - torch_acc[run]["accuracy"][n]) > 1e-9]
    if not off:
        return (f"Served accuracy equals the PyTorch library's in all {len(pairs)} (run, n) pairs that "
                "pytorch_accuracy.json holds.")
    return f"Served accuracy differs from the PyTorch library's in {len(off)} of {len(pairs)} (run, n) pairs: {off}."


def label(r: dict) -> str:
    return r["variant"] + (" (Houlsby)" if r["method"] == "double_seq_bn" else "")


def write_markdown(results: dict, torch_acc: dict, path: str, plot_rel: str, fusion: dict | None = None) -> None:
    ns = [str(n) for n in range(NUM_LAYERS + 1)]
    lines = ["# AdapterDrop on real tasks: accuracy vs dropped layers", "",
             "Generated by `make eval` (tools/eval_trained.py); do not edit by hand. Backbone: all-MiniLM-L6-v2",
             "(6 layers, frozen). Adapters and heads trained by tools/train/ (models/trained/*/train_config.json:",
             "2 epochs, batch 32, AdamW lr 1e-3). n = adapters dropped from layers 0..n-1 at inference; every",
             "number below was measured **through the server over gRPC** on the task's whole test split",
             "(splits: models/trained/splits.json). The served logits equal the PyTorch `adapters` library's",
             "within 1e-3 at every golden depth (tests/python/test_trained_golden.py, 64 test inputs per run and",
             "n = 0, 3, 5, 6); *torch* rows, when present, are the library's accuracy on the same split",
             "(models/trained/pytorch_accuracy.json, `tools/train/golden.py --accuracy`). Sampling noise: one",
             "standard error is about 1.3 points at 1000 test examples and 2 points at 400 (for 80 % accuracy).", "",
             "Server binary that measured them: " + ", ".join(sorted({f"`{r.get('server', '?')}`" for r in results.values()}))
             + " (accuracy does not depend on the build profile: the same ONNX Runtime graphs run either way).", "",
             agreement(results, torch_acc), "",
             f"![accuracy vs dropped layers]({plot_rel})", "",
             "## Test accuracy (%)", "",
             "| task | variant | test size | " + " | ".join(f"n={n}" for n in ns) + " |",
             "|---|---|---|" + "---|" * len(ns)]
    for run, r in ordered(results):
        lines.append(f"| {r['task']} | {label(r)} | {r['test_size']} | "
                     + " | ".join(f"{100 * r['accuracy'][n]:.1f}" for n in ns) + " |")
        if run in torch_acc:
            t = torch_acc[run]["accuracy"]
            lines.append("| | *torch* | | " + " | ".join(f"*{100 * t[n]:.1f}*" if n in t else "" for n in ns) + " |")
    lines += ["", "## Retention vs the paper", "",
              "Retention = accuracy at n / accuracy of the standard adapter of the same task at n = 0 (the paper's",
              "\"full-adapter performance\"). The paper (Rücklé et al. 2021, Fig. 2 / Table 8; RoBERTa-base, 12",
              "layers, 8 GLUE tasks) reports at n = 5 of 12: specialized 97.1 %, robust 95.4 %. With 6 layers",
              "the closest depths are n = 2 (33 %) and n = 3 (50 %); the specialized adapters here were trained",
              "for n = 3.", "",
              "| task | variant | n=2 | n=3 | paper (n=5 of 12) |", "|---|---|---|---|---|"]
    base = {r["task"]: r["accuracy"]["0"] for r in results.values()
            if r["variant"] == "standard" and r["method"] == "seq_bn"}
    means = {}
    for run, r in ordered(results):
        if r["method"] != "seq_bn" or r["task"] not in base:
            continue
        ret = {n: 100 * r["accuracy"][n] / base[r["task"]] for n in ("2", "3")}
        means.setdefault(r["variant"], []).append(ret)
        lines.append(f"| {r['task']} | {r['variant']} | {ret['2']:.1f} % | {ret['3']:.1f} % | "
                     f"{PAPER.get(r['variant'], '-')}{' %' if r['variant'] in PAPER else ''} |")
    for v, rows in means.items():
        lines.append(f"| **mean** | {v} | {np.mean([x['2'] for x in rows]):.1f} % | "
                     f"{np.mean([x['3'] for x in rows]):.1f} % | {PAPER.get(v, '-')}{' %' if v in PAPER else ''} |")
    lines += ["", "Reproduce: `make eval` (needs models/trained/, committed; retraining: tools/train/README.md).", ""]
    if fusion:  # docs/results-fusion.json, from tools/eval_fusion.py
        from adapterdrop_tools.fusion_report import section
        lines += section(fusion, results)
    tagging_path = os.path.splitext(path)[0] + "-tagging.json"  # tools/eval_tagging.py
    if os.path.isfile(tagging_path):
        from adapterdrop_tools.tagging_report import section as tagging_section
        with open(tagging_path, encoding="utf-8") as f:
            lines += tagging_section(json.load(f))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_plot(results: dict, path: str, fusion: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = [t for t in datasets.TASKS if any(r["task"] == t for r in results.values())]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    style = {"standard": "o-", "specialized": "s-", "robust": "^-"}
    color = {"standard": "tab:red", "specialized": "tab:green", "robust": "tab:blue"}
    for ax, task in zip(axes[0], tasks):
        for run, r in ordered(results):
            if r["task"] != task:
                continue
            ys = [100 * r["accuracy"][str(n)] for n in range(NUM_LAYERS + 1)]
            pfeiffer = r["method"] == "seq_bn"
            ax.plot(range(NUM_LAYERS + 1), ys, style[r["variant"]] if pfeiffer else "x--",
                    color=color[r["variant"]] if pfeiffer else "tab:purple", label=label(r))
        for t, shade in zip(fusion["tasks"] if fusion and task == "sentiment" else [], ("black", "dimgray", "darkgray")):
            ax.plot(range(NUM_LAYERS + 1), [100 * t["accuracy"][str(n)] for n in range(NUM_LAYERS + 1)], "d-.",
                    color=shade, label=f"fusion, {len(t['kept'])} adapter{'s' if len(t['kept']) > 1 else ''}")
        ax.axvline(3, color="grey", lw=0.8, ls=":")  # the specialized adapters' training depth
        ax.set_title(f"{task} ({len(datasets.LABELS[task])} classes)")
        ax.set_xlabel("n: layers without adapters (of 6)")
        ax.set_xticks(range(NUM_LAYERS + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test accuracy (%), served over gRPC")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "adapterdrop-serve"))
    p.add_argument("--repo", default=str(ROOT / "build" / "eval-repo"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "results.png"))
    p.add_argument("--cache", default=str(ROOT / "build" / "eval-cache"),
                   help="per-run results, reused while the run's weights and test split are unchanged")
    p.add_argument("--measure-only", action="store_true", help="measure (and cache) runs; write no report")
    p.add_argument("--reverse", action="store_true", help="measure uncached runs in reverse order")
    p.add_argument("--lock", action="store_true", help="skip runs another --lock process is measuring")
    a = p.parse_args(argv)
    results = measure(a.binary, a.repo, a.cache, a.reverse, a.lock)
    if a.measure_only:
        return 0
    missing = [r for r in trained.runs() if r not in results]
    if missing:
        raise SystemExit(f"runs not measured (locked by another process?): {missing}")
    torch_path = os.path.join(trained.TRAINED_DIR, "pytorch_accuracy.json")
    torch_acc = json.load(open(torch_path, encoding="utf-8")) if os.path.isfile(torch_path) else {}
    with open(os.path.splitext(a.out)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    fusion_path = os.path.splitext(a.out)[0] + "-fusion.json"  # tools/eval_fusion.py (make eval-fusion)
    fusion = json.load(open(fusion_path, encoding="utf-8")) if os.path.isfile(fusion_path) else None
    write_plot(results, a.plot, fusion)
    write_markdown(results, torch_acc, a.out, os.path.relpath(a.plot, os.path.dirname(a.out)), fusion)
    print(f"wrote {a.out}, {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
