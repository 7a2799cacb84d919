#!/usr/bin/env python3
"""`make eval`, tagging part: word-level UPOS accuracy of every trained tagger at n = 0..6, measured through
the server, next to the library's own accuracy on the same words (golden.json, from train_tagging.py).

Usage: eval_tagging.py [--binary target/release/adapterdrop-serve] [--repo build/eval-tagging-repo]

Starts the server on a repository holding only the minilm backbone, registers each tagging run in
models/trained/ with `register_task.py --weights-only` (robust 0..6), sends the whole test split over gRPC
(64 sentences per request, one TaskRef per n), writes docs/results-tagging.json and re-renders
docs/results.md (its tagging section) from the committed raw numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools import datasets_tagging, served_tagging, trained  # noqa: E402
from adapterdrop_tools.served import ROOT, Server, load_stubs  # noqa: E402

NUM_LAYERS = 6


def measure(binary: str, repo: str) -> dict:
    pb, pb_grpc = load_stubs()
    splits = datasets_tagging.check_recorded()
    test = splits["test"].sentences
    train_tags = [t for s in splits["train"].sentences for _, _, t in s.words]
    majority = max(set(train_tags), key=train_tags.count)
    test_tags = [t for s in test for _, _, t in s.words]
    if not os.path.isdir(os.path.join(repo, "backbones", "minilm")):
        served_tagging.backbone_repo(repo)
    out = {"majority_baseline": {"tag": majority, "accuracy": test_tags.count(majority) / len(test_tags)}, "runs": {}}
    with Server(binary, repo) as srv:
        ch = grpc.insecure_channel(srv.addr)
        stub = pb_grpc.InferenceStub(ch)
        for run, cfg in trained.tagging_runs().items():
            t0 = time.time()
            d = os.path.join(trained.TRAINED_DIR, run)
            served_tagging.register(srv, d, run, NUM_LAYERS)
            got = served_tagging.served(stub, pb, run, [s.text for s in test], range(NUM_LAYERS + 1))
            acc = {str(n): served_tagging.accuracy(test, got[n]) for n in got}
            with open(os.path.join(d, "golden.json"), encoding="utf-8") as f:
                torch_acc = json.load(f)["pytorch_test_accuracy"]
            out["runs"][run] = {"task": cfg["task"], "test_sentences": len(test), "scored_words": acc["0"][1],
                                "accuracy": {n: a for n, (a, _) in acc.items()}, "pytorch_accuracy": torch_acc,
                                "server": os.path.relpath(binary, ROOT)}
            print(f"{run}: " + " ".join(f"{n}:{a:.4f}" for n, (a, _) in acc.items()) + f" ({time.time() - t0:.0f}s)",
                  flush=True)
        ch.close()
    return out


def rerender() -> None:
    """docs/results.md from the committed raw numbers (docs/results.json, -fusion.json, -tagging.json)."""
    import eval_trained
    docs = ROOT / "docs"
    with open(docs / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    torch_path = os.path.join(trained.TRAINED_DIR, "pytorch_accuracy.json")
    torch_acc = json.load(open(torch_path, encoding="utf-8")) if os.path.isfile(torch_path) else {}
    fusion_path = docs / "results-fusion.json"
    fusion = json.load(open(fusion_path, encoding="utf-8")) if fusion_path.is_file() else None
    eval_trained.write_markdown(results, torch_acc, str(docs / "results.md"), "results.png", fusion)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "adapterdrop-serve"))
    p.add_argument("--repo", default=str(ROOT / "build" / "eval-tagging-repo"))
    p.add_argument("--json", default=str(ROOT / "docs" / "results-tagging.json"))
    p.add_argument("--render-only", action="store_true", help="re-render docs/results.md from --json")
    a = p.parse_args(argv)
    if not a.render_only:
        data = measure(a.binary, a.repo)
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
    rerender()
    print(f"wrote {a.json}, docs/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
