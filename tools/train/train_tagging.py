#!/usr/bin/env python3
"""Train a Pfeiffer adapter + tagging head on frozen all-MiniLM-L6-v2 for Turkish UPOS (issue 14).

Usage (in .venv-train, PYTHONPATH=tools):
  train_tagging.py --out models/trained/pos-tr-robust [--epochs 3] [--threads 2]

Data: tools/adapterdrop_tools/datasets_tagging.py (turkish-treebanks==1.0.0, recorded splits). Each word of
the tokenizer (the server's word view) that starts a treebank word is labelled on its first sub-token; every
other token is -100, as the library's tagging head is trained. Robust AdapterDrop: n drawn uniformly from
0..num_layers-1 per batch (`skip_layers=[0..n-1]`), like the `*-robust` classifiers, so one set of weights
serves any n. Saves with save_adapter(..., with_head=True, use_safetensors=True), train_config.json,
train_log.txt, and golden.json: the library's own word-level test accuracy at n = 0..6 and, for the first
GOLDEN_COUNT test sentences, its token logits (n = 0, 3, 6) and word tags (n = 0..6), which
tests/python/test_trained_tagging.py checks the served ones against.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from adapterdrop_tools import datasets_tagging as data  # noqa: E402
from train import BACKBONE, minilm_path, open_log, seed_all, set_drop, tokenizer, trainable_parameters  # noqa: E402

GOLDEN_COUNT = 8
GOLDEN_LOGIT_NS = (0, 3, 6)


def encode(tok, sentences: list) -> dict:
    """Padded tensors, labels (-100 off first sub-tokens of labelled words) and per row the token
    positions of the labelled words."""
    enc = tok.encode_batch([s.text for s in sentences])
    width = max(len(e.ids) for e in enc)
    ids = torch.zeros(len(enc), width, dtype=torch.long)
    mask, types = torch.zeros_like(ids), torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (e, s) in enumerate(zip(enc, sentences)):
        n = len(e.ids)
        ids[i, :n], mask[i, :n], types[i, :n] = torch.tensor(e.ids), 1, torch.tensor(e.type_ids)
        gold, prev = s.gold_at(), None
        for t, (w, (start, _)) in enumerate(zip(e.word_ids, e.offsets)):
            if w is not None and w != prev and start in gold:
                labels[i, t] = gold[start]
            prev = w
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, labels


@torch.no_grad()
def predict(model, tok, sentences: list, batch: int = 64) -> list:
    """[(logits [tokens, labels] np, labels [tokens] np)] per sentence, unpadded."""
    model.eval()
    out = []
    for i in range(0, len(sentences), batch):
        inputs, labels = encode(tok, sentences[i:i + batch])
        logits = model(**inputs).logits.float().numpy()
        for r, n in enumerate(inputs["attention_mask"].sum(1).tolist()):
            out.append((logits[r, :n], labels[r, :n].numpy()))
    return out


def word_accuracy(preds: list) -> float:
    hit = total = 0
    for logits, labels in preds:
        keep = labels != -100
        hit += int((logits[keep].argmax(-1) == labels[keep]).sum())
        total += int(keep.sum())
    return hit / total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, help="smoke test: use only this many training sentences")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import adapters
    from adapters import AutoAdapterModel

    seed_all(a.seed, a.threads)
    name = os.path.basename(os.path.normpath(a.out))
    splits = data.check_recorded()
    train = splits["train"].sentences[:a.limit] if a.limit else splits["train"].sentences
    path = minilm_path()
    tok = tokenizer(path)
    model = AutoAdapterModel.from_pretrained(path)
    model.add_adapter(name, config=adapters.AdapterConfig.load("seq_bn"))
    model.add_tagging_head(name, num_labels=len(data.LABELS), id2label=dict(enumerate(data.LABELS)))
    model.train_adapter(name)
    num_layers = model.config.num_hidden_layers
    say = open_log(a.out)
    trainable = trainable_parameters(model)
    say(f"{name}: {data.TASK} UPOS, robust, {len(train)} train sentences, {trainable} trainable parameters, "
        f"torch {torch.__version__}, {a.threads} threads")

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr, weight_decay=0.0)
    steps = (len(train) + a.batch_size - 1) // a.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / (steps * a.epochs)))
    rng, drawn, t0 = random.Random(a.seed), [], time.time()
    for epoch in range(a.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        model.train()
        run_loss = 0.0
        for b in range(steps):
            n = rng.randint(0, num_layers - 1)
            drawn.append(n)
            set_drop(model, name, n)
            inputs, labels = encode(tok, [train[i] for i in order[b * a.batch_size:(b + 1) * a.batch_size]])
            logits = model(**inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            run_loss += loss.item()
            if (b + 1) % 20 == 0:
                say(f"epoch {epoch} step {b + 1}/{steps} loss {run_loss / 20:.4f} n {n} "
                    f"{time.time() - t0:.0f}s")
                run_loss = 0.0
    train_s = time.time() - t0

    ns = range(num_layers + 1)
    dev, test, golden = {}, {}, {"count": GOLDEN_COUNT, "split": "test", "logits": {}, "word_tags": {}}
    for n in ns:
        set_drop(model, name, n)
        if n == 0:  # dev at n = 0 only: CPU time (the test split is scored at every n below)
            dev[str(n)] = word_accuracy(predict(model, tok, splits["dev"].sentences))
        preds = predict(model, tok, splits["test"].sentences)
        test[str(n)] = word_accuracy(preds)
        golden["word_tags"][str(n)] = [[data.LABELS[int(i)] for i in lg[lb != -100].argmax(-1)]
                                       for lg, lb in preds[:GOLDEN_COUNT]]
        if n in GOLDEN_LOGIT_NS:
            golden["logits"][str(n)] = [np.round(lg, 5).tolist() for lg, _ in preds[:GOLDEN_COUNT]]
        say(f"n={n}: test word accuracy {test[str(n)]:.4f}" + (f", dev {dev[str(n)]:.4f}" if str(n) in dev else ""))
    golden["pytorch_test_accuracy"] = test
    set_drop(model, name, 0)
    model.save_adapter(a.out, name, with_head=True, use_safetensors=True,
                       meta_dict={"model_name": "sentence-transformers/all-MiniLM-L6-v2"})
    with open(os.path.join(a.out, "golden.json"), "w", encoding="utf-8") as f:
        json.dump(golden, f)
        f.write("\n")
    cfg = {"task": data.TASK, "head": "tagging", "variant": "robust", "method": "seq_bn", "adapter_name": name,
           "data": data.PACKAGE, "train_drop": f"uniform 0..{num_layers - 1} per batch", "epochs": a.epochs,
           "batch_size": a.batch_size, "lr": a.lr, "optimizer": "AdamW, linear decay, wd 0", "seed": a.seed,
           "train_sentences": len(train), "labels": data.LABELS, "trainable_parameters": trainable,
           "train_seconds": round(train_s, 1), "dev_word_accuracy": dev, "threads": a.threads,
           "robust_draw_histogram": {str(k): drawn.count(k) for k in sorted(set(drawn))}, "backbone": BACKBONE,
           "versions": {"torch": torch.__version__, "adapters": adapters.__version__,
                        "transformers": __import__("transformers").__version__}}
    with open(os.path.join(a.out, "train_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    say(f"trained in {train_s:.0f}s; saved to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
