#!/usr/bin/env python3
"""Prune an AdapterFusion task (AdapterDrop paper, section 5): run a dataset through the server,
average each fused adapter's fusion attention weight per slot, keep the top k, write a pruned task.

Usage:
  prune_fusion.py --server HOST:PORT --repo REPO --task NAME [--version N]
                  (--texts FILE | --test-repo-inputs) --keep K [--mode per-layer|global]
                  --name NEW_TASK [--out-version 1] [--batch 32] [--drop-first n] [--weights-out FILE] [--force]

--texts FILE: one input text per line (blank lines skipped). --test-repo-inputs: the token ids of the
task's cases in REPO/expected.json (tools/make_test_repo.py). Requests ask for
`return_fusion_weights`; per-request averages are combined weighted by their token counts.
Fusion slots are ranked at the task's lowest servable drop depth (robust: min) unless --drop-first.
--mode per-layer keeps the k adapters with the highest average weight in each slot; global keeps one
set of k, ranked by the mean of the per-slot averages. The pruned task is written beside the source
in REPO with byte-identical fusion graphs (the same Q/K/V weights), kept adapter graphs and head; the
server picks it up on restart (or by repository polling where enabled).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import grpc  # noqa: E402

from adapterdrop_tools import ExportError  # noqa: E402
from adapterdrop_tools.fusion_task import latest_version, prune_task, rank, read_task  # noqa: E402


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def collect(stub, pb, task: str, version: int, drop_first, inputs: list, batch: int, timeout: float) -> dict:
    """"layer:location" -> {adapter: token-weighted average weight} over all inputs."""
    sums, tokens = {}, {}
    for chunk in batches(inputs, batch):
        if isinstance(chunk[0], str):
            feed = {"texts": pb.Texts(texts=chunk), "truncate": True}
        else:
            feed = {"tokens": pb.TokenizedInputs(sequences=[pb.TokenIds(input_ids=ids, token_type_ids=tt) for ids, tt in chunk])}
        ref = pb.TaskRef(name=task, version=version)
        if drop_first is not None:
            ref.drop_first = drop_first
        resp = stub.Infer(pb.InferRequest(tasks=[ref], return_fusion_weights=True, **feed), timeout=timeout)
        for w in resp.results[0].fusion_weights:
            key = f"{w.layer}:{w.location}"
            acc = sums.setdefault(key, {})
            for name, v in zip(w.adapters, w.weights):
                acc[name] = acc.get(name, 0.0) + float(v) * w.tokens
            tokens[key] = tokens.get(key, 0) + w.tokens
    return {k: {n: s / tokens[k] for n, s in acc.items()} for k, acc in sums.items() if tokens[k]}


def read_inputs(a, repo: str, task: str) -> list:
    if a.texts:
        with open(a.texts, encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
        if not texts:
            raise ExportError(f"{a.texts} has no non-empty line")
        return texts
    path = os.path.join(repo, "expected.json")
    if not os.path.isfile(path):
        raise ExportError(f"--test-repo-inputs needs {path} (tools/make_test_repo.py)")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)["tasks"].get(task)
    if spec is None:
        raise ExportError(f"task {task!r} is not in {path}")
    return [(ids, tt) for c in spec["cases"] for ids, tt in zip(c["input_ids"], c["token_type_ids"])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True, help="HOST:PORT of adapterdrop-serve's gRPC port")
    p.add_argument("--repo", required=True, help="model repository holding the fusion task")
    p.add_argument("--task", required=True)
    p.add_argument("--version", type=int, help="source version (default: the highest in REPO)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", help="file with one text per line")
    src.add_argument("--test-repo-inputs", action="store_true", help="the task's cases in REPO/expected.json")
    p.add_argument("--keep", type=int, required=True, help="adapters to keep (per slot, or in total for global)")
    p.add_argument("--mode", choices=["per-layer", "global"], default="per-layer")
    p.add_argument("--name", required=True, help="name of the pruned task")
    p.add_argument("--out-version", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--drop-first", type=int, help="drop depth of the ranking requests (default: the task's lowest)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--weights-out", help="also write the averaged weights and the kept sets as JSON here")
    p.add_argument("--stubs", help="folder with generated adapterdrop_pb2*.py (default: generate)")
    p.add_argument("--force", action="store_true", help="replace an existing pruned task version")
    a = p.parse_args(argv)
    try:
        from client import load_stubs

        version = a.version or latest_version(a.repo, a.task)
        m = read_task(a.repo, a.task, version)
        drop = a.drop_first
        if drop is None and "robust" in m["drop"]:
            drop = m["drop"]["robust"]["min"]
        inputs = read_inputs(a, a.repo, a.task)
        pb, pb_grpc = load_stubs(a.stubs)
        with grpc.insecure_channel(a.server) as ch:
            weights = collect(pb_grpc.InferenceStub(ch), pb, a.task, version, drop, inputs, a.batch, a.timeout)
        slots = {f"{s['layer']}:{s['location']}" for s in m["slots"]}
        missing = sorted(slots - set(weights))
        if missing:
            raise ExportError(f"no fusion weights came back for slots {missing} (dropped at drop_first={drop}?)")
        keep = rank(weights, a.keep, a.mode)
        info = {"mode": a.mode, "k": a.keep, "inputs": len(inputs), "drop_first": drop, "average_weights": weights}
        out = prune_task(a.repo, a.task, version, keep, a.name, a.out_version, info, force=a.force)
        if a.weights_out:
            with open(a.weights_out, "w", encoding="utf-8") as f:
                json.dump({"weights": weights, "kept": keep}, f, indent=2)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"error: the server answered {e.code().name}: {e.details()}", file=sys.stderr)
        return 3
    for key in sorted(keep, key=lambda k: (int(k.split(":")[0]), k)):
        ranked = sorted(weights[key].items(), key=lambda kv: -kv[1])
        print(f"{key}: kept {keep[key]}  (" + ", ".join(f"{n} {v:.3f}" for n, v in ranked) + ")")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
