#!/usr/bin/env python3
"""Train an AdapterFusion (dynamic) over the three trained *standard* adapters for sentiment.

Usage (in .venv-train, PYTHONPATH=tools):
  train_fusion.py --out models/trained/sentiment-fusion [--limit 2000] [--epochs 1]

Loads all-MiniLM-L6-v2 and the committed sentiment-standard, topic-standard and subjectivity-standard
adapters (frozen), adds a "dynamic" AdapterFusion over them and a new classification head, and trains
only the fusion layers + head on the sentiment train split (AdapterFusion paper, Pfeiffer et al. 2021:
the target task's own adapter is one of the fused ones). Saves with the library's save_adapter_fusion
(with the head) + train_config.json, train_log.txt, then reloads what was saved into a fresh model and
writes golden.json: the library's logits of the first --count sentiment test inputs at n = 0, 3, 6
(skip_layers = [0..n-1] drops the whole adapter layer, fusion included, in layers 0..n-1).
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
from train import fit, limited, logits, minilm_path, open_log, seed_all, tokenizer, trainable_parameters, write_config  # noqa: E402

FUSED = ("sentiment-standard", "topic-standard", "subjectivity-standard")
GOLDEN_N = (0, 3, 6)
TASK = "sentiment"


def fused_model(path: str, trained: str):
    from adapters import AutoAdapterModel
    model = AutoAdapterModel.from_pretrained(path)
    for run in FUSED:
        model.load_adapter(os.path.join(trained, run), with_head=False, use_safetensors=True)
    return model


def set_drop(model, n: int) -> None:
    from adapters.composition import Fuse
    model.set_active_adapters(Fuse(*FUSED), skip_layers=list(range(n)) if n else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trained", default="models/trained")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, help="use only this many training examples")
    p.add_argument("--count", type=int, default=64, help="golden test inputs")
    a = p.parse_args(argv)

    from adapters.composition import Fuse
    seed_all(a.seed, a.threads)
    name = os.path.basename(os.path.normpath(a.out))
    splits = datasets.check_recorded(TASK)
    labels = datasets.LABELS[TASK]
    path = minilm_path()
    tok = tokenizer(path)
    model = fused_model(path, a.trained)
    fuse = Fuse(*FUSED)
    model.add_adapter_fusion(fuse, "dynamic")
    model.add_classification_head(name, num_labels=len(labels), id2label=dict(enumerate(labels)))
    model.train_adapter_fusion(fuse)  # backbone + fused adapters frozen; fusion layers train
    for p_ in model.heads[name].parameters():
        p_.requires_grad = True
    model.active_head = name
    trainable = trainable_parameters(model)
    train = limited(splits["train"], a.limit)
    say = open_log(a.out)
    say(f"{name}: dynamic AdapterFusion over {', '.join(FUSED)} for {TASK}, {len(train.texts)} train examples, "
        f"{trainable} trainable parameters, torch {torch.__version__}, {a.threads} threads")
    set_drop(model, 0)
    train_s = fit(model, tok, train, a, say, log_every=10)
    dev = splits["dev"]
    acc = float((logits(model, tok, dev.texts).argmax(-1) == np.array(dev.labels)).mean())
    say(f"trained in {train_s:.0f}s; dev accuracy n=0: {acc:.4f}")
    model.save_adapter_fusion(a.out, fuse, with_head=name, use_safetensors=True,
                              meta_dict={"model_name": "sentence-transformers/all-MiniLM-L6-v2"})
    write_config(a.out, {
        "task": TASK, "variant": "fusion", "method": "fusion-dynamic", "fusion_name": fuse.name,
        "fused_adapters": list(FUSED), "train_drop": 0,
        "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "optimizer": "AdamW, linear decay, wd 0",
        "seed": a.seed, "train_examples": len(train.texts), "labels": labels, "trainable_parameters": trainable,
        "train_seconds": round(train_s, 1), "dev_accuracy": {"0": acc}})
    say(f"saved to {a.out}")

    # golden logits from what was saved, reloaded into a fresh model
    fresh = fused_model(path, a.trained)
    fresh.load_adapter_fusion(a.out, with_head=True, use_safetensors=True)
    fresh.active_head = name
    test = splits["test"]
    res = {"task": TASK, "variant": "fusion", "method": "fusion-dynamic", "count": a.count, "logits": {}}
    for n in GOLDEN_N:
        set_drop(fresh, n)
        out = logits(fresh, tok, test.texts[:a.count])
        res["logits"][str(n)] = [[round(float(v), 6) for v in row] for row in out]
    set_drop(fresh, 0)
    same = float(np.abs(logits(fresh, tok, dev.texts[:64]) - logits(model, tok, dev.texts[:64])).max())
    say(f"reloaded fusion vs trained model, 64 dev inputs: max abs diff {same:.2e}")
    with open(os.path.join(a.out, "golden.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, separators=(",", ":"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
