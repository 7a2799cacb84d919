#!/usr/bin/env python3
"""Golden logits and test accuracy of the trained adapters, computed by the PyTorch `adapters` library.

Usage (in .venv-train, PYTHONPATH=tools): golden.py [--trained models/trained] [--count 64]

Every run in models/trained/*/ is reloaded from its saved AdapterHub directory (load_adapter, with the
head) into a fresh all-MiniLM-L6-v2, so what is checked is what was committed. Writes
  golden_logits.json     logits of the first --count test inputs (identified by split and index only)
                         at n = 0, 3, 5, 6 dropped layers (skip_layers = [0..n-1])
  pytorch_accuracy.json  with --accuracy: accuracy on the whole test split at n = 0..6
(each run's part first goes to <run>/golden.json, so runs can be evaluated as soon as they are trained).
The serving test (tests/python/test_trained_golden.py) compares the server with golden_logits.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapterdrop_tools import datasets  # noqa: E402
from train import logits, minilm_path, set_drop, tokenizer  # noqa: E402

GOLDEN_N = (0, 3, 5, 6)
ACCURACY_N = ()  # whole-test-split accuracy: none by default (CPU time); the server measures every n (make eval)


def runs(trained: str) -> list:
    """Adapter runs (a fusion run, with adapter_fusion_config.json, writes its golden.json itself)."""
    from adapterdrop_tools.trained import runs as classifier_runs  # tagging runs write their golden.json themselves
    return sorted(classifier_runs(trained))


def evaluate_run(d: str, count: int, path: str, tok, splits: dict, accuracy_n=ACCURACY_N) -> dict:
    """Golden logits + test accuracy of one saved run; also written to <run>/golden.json."""
    from adapters import AutoAdapterModel
    with open(os.path.join(d, "train_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    model = AutoAdapterModel.from_pretrained(path)
    name = model.load_adapter(d, with_head=True, use_safetensors=True)
    test = splits[cfg["task"]]["test"]
    res = {"task": cfg["task"], "variant": cfg["variant"], "method": cfg["method"], "count": count,
           "logits": {}, "accuracy": {}}
    for n in sorted(set(GOLDEN_N) | set(accuracy_n)):
        set_drop(model, name, n)
        out = logits(model, tok, test.texts if n in accuracy_n else test.texts[:count])
        if n in accuracy_n:
            res["accuracy"][str(n)] = float((out.argmax(-1) == np.array(test.labels)).mean())
        if n in GOLDEN_N:
            res["logits"][str(n)] = [[round(float(v), 6) for v in row] for row in out[:count]]
    with open(os.path.join(d, "golden.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, separators=(",", ":"))
    return res


def merge(trained: str, count: int) -> None:
    golden = {"library": {"adapters": __import__("adapters").__version__, "torch": torch.__version__,
                          "transformers": __import__("transformers").__version__},
              "inputs": {"split": "test", "indices": f"0..{count - 1}"}, "n": list(GOLDEN_N), "runs": {}}
    acc = {}
    for run in runs(trained):
        with open(os.path.join(trained, run, "golden.json"), encoding="utf-8") as f:
            res = json.load(f)
        if res["count"] != count:
            raise SystemExit(f"{run}/golden.json has {res['count']} inputs, want {count}")
        golden["runs"][run] = {k: res[k] for k in ("task", "variant", "method", "logits")}
        if res["accuracy"]:
            acc[run] = {k: res[k] for k in ("task", "variant", "method", "accuracy")}
    with open(os.path.join(trained, "golden_logits.json"), "w", encoding="utf-8") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    if acc:
        with open(os.path.join(trained, "pytorch_accuracy.json"), "w", encoding="utf-8") as f:
            json.dump(acc, f, indent=1)
            f.write("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trained", default="models/trained")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run", action="append", help="only these runs (default: every run without golden.json)")
    p.add_argument("--all", action="store_true", help="recompute runs that already have golden.json")
    p.add_argument("--no-merge", action="store_true")
    p.add_argument("--accuracy", action="store_true", help="also whole-test-split accuracy at n = 0..L (slow)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    path = minilm_path()
    tok = tokenizer(path)
    splits = {t: datasets.check_recorded(t) for t in datasets.TASKS}
    for run in a.run or runs(a.trained):
        d = os.path.join(a.trained, run)
        if not a.run and not a.all and os.path.isfile(os.path.join(d, "golden.json")):
            continue
        res = evaluate_run(d, a.count, path, tok, splits, range(7) if a.accuracy else ACCURACY_N)
        print(run, " ".join(f"{k}:{v:.3f}" for k, v in res["accuracy"].items()), flush=True)
    if not a.no_merge:
        merge(a.trained, a.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
