"""Write AdapterFusion tasks into a model repository, and pruned copies of them (models/README.md,
"Fusion tasks"). A fusion task directory holds:

  task.json                       slots of kind "fusion", each naming its fusion graph and adapter graphs
  fusion/layer<i>_<loc>.onnx      (h, x, up [B,T,N,H]) -> (y, alpha [B,T,N]); N is dynamic
  adapters/<name>/layer<i>_<loc>.onnx   (h, x) -> up, one per fused adapter and slot
  head.onnx

A pruned task keeps byte-identical copies of the fusion graphs (the same Q/K/V weights) and of the
kept adapters' graphs; the server loads identical graph files once and computes each adapter once per
row set, however many fusion tasks use it.
"""
from __future__ import annotations

import json
import os
import shutil

from . import ExportError, InvalidCheckpoint
from .adapterhub import Adapter, Head
from .fusion import Fusion, adapter_up_graph, check_compatible, fusion_graph
from .graphs_task import head_graph
from .onnx_builder import save
from .repository import FORMAT_VERSION, check_name, install_task_version, kept_slots, read_backbone


def write_fusion_task(repo: str, backbone: str, fusion: Fusion, adapters: dict, head: Head, lns, name: str,
                      version: int, drop: dict, description: str | None = None, force: bool = False,
                      form: str = "reassociated") -> str:
    """`adapters` maps every name in fusion.adapter_names to its Adapter; `lns` as in write_task;
    `form`: fusion graph form (fusion.fusion_graph), recorded in task.json."""
    check_name("task", name)
    for n in fusion.adapter_names:
        check_name("adapter", n)
        if n not in adapters:
            raise InvalidCheckpoint(f"fusion {fusion.name!r} needs adapter {n!r}, which was not given")
    if int(version) < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    bb = read_backbone(repo, backbone)
    L, H, eps = int(bb["num_layers"]), int(bb["hidden_size"]), float(bb["layer_norm_eps"])
    used = {n: adapters[n] for n in fusion.adapter_names}
    check_compatible(fusion, used)
    if any(a.hidden_size != H for a in used.values()):
        raise InvalidCheckpoint(f"an adapter's hidden size differs from backbone {backbone!r} hidden {H}")
    rules = used[fusion.adapter_names[-1]]

    def build(tmp: str) -> dict:
        os.makedirs(os.path.join(tmp, "fusion"))
        slots = []
        for layer, loc, fw in kept_slots(fusion.slots, drop, L, "fusion"):
            lw, lb = lns.ln(layer, loc)
            rel = f"fusion/layer{layer}_{loc}.onnx"
            save(fusion_graph(fusion, rules, fw, H, lw, lb, eps, f"{name}_fusion{layer}_{loc}", form), os.path.join(tmp, rel))
            refs = []
            for n in fusion.adapter_names:
                arel = f"adapters/{n}/layer{layer}_{loc}.onnx"
                os.makedirs(os.path.join(tmp, "adapters", n), exist_ok=True)
                save(adapter_up_graph(used[n], layer, loc, lw, lb, eps, f"{n}_layer{layer}_{loc}"), os.path.join(tmp, arel))
                refs.append({"name": n, "graph": arel})
            slots.append({"layer": layer, "location": loc, "kind": "fusion", "graph": rel, "adapters": refs})
        save(head_graph(head, H), os.path.join(tmp, "head.onnx"))
        return {
            "format_version": FORMAT_VERSION, "name": name, "version": int(version), "backbone": backbone,
            "description": description or f"AdapterFusion {fusion.name!r} ({fusion.config_name})",
            "adapter": {"method": "fusion", "fusion_name": fusion.name, "fusion_config": fusion.config_name,
                        "fusion": fusion.config, "fusion_graph_form": form, "adapters": list(fusion.adapter_names),
                        "adapter_sources": {n: used[n].source for n in fusion.adapter_names},
                        "source": fusion.source},
            "slots": slots,
            "drop": drop,
            "head": {"type": head.kind, "graph": "head.onnx", "labels": list(head.labels)},
        }

    return install_task_version(repo, name, version, force, build)


def read_task(repo: str, name: str, version: int) -> dict:
    path = os.path.join(repo, "tasks", name, str(int(version)), "task.json")
    if not os.path.isfile(path):
        raise ExportError(f"task {name}@{version} not found ({path} missing)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def latest_version(repo: str, name: str) -> int:
    d = os.path.join(repo, "tasks", name)
    versions = [int(v) for v in os.listdir(d) if v.isdigit()] if os.path.isdir(d) else []
    if not versions:
        raise ExportError(f"task {name!r} has no version in {repo}")
    return max(versions)


def prune_task(repo: str, src: str, src_version: int, keep: dict, name: str, version: int,
               pruning: dict | None = None, description: str | None = None, force: bool = False) -> str:
    """Copy fusion task `src` keeping, per slot key "layer:location", only the adapters in `keep`
    (in the source order). Fusion graphs, adapter graphs and head are copied byte for byte."""
    check_name("task", name)
    m = read_task(repo, src, src_version)
    if m.get("adapter", {}).get("method") != "fusion":
        raise ExportError(f"task {src}@{src_version} is not a fusion task")
    sdir = os.path.join(repo, "tasks", src, str(int(src_version)))

    def build(tmp: str) -> dict:
        slots, kept_all = [], []
        for s in m["slots"]:
            key = f"{s['layer']}:{s['location']}"
            if s.get("kind") != "fusion":
                raise ExportError(f"slot {key} of {src} is not a fusion slot")
            want = keep.get(key)
            if not want:
                raise ExportError(f"no adapters kept for slot {key}")
            have = [a["name"] for a in s["adapters"]]
            unknown = [n for n in want if n not in have]
            if unknown:
                raise ExportError(f"slot {key}: adapters {unknown} are not in {src}'s {have}")
            refs = [a for a in s["adapters"] if a["name"] in want]
            for f in [s["graph"]] + [a["graph"] for a in refs]:
                os.makedirs(os.path.dirname(os.path.join(tmp, f)), exist_ok=True)
                shutil.copyfile(os.path.join(sdir, f), os.path.join(tmp, f))
            slots.append({**s, "adapters": refs})
            kept_all += [a["name"] for a in refs if a["name"] not in kept_all]
        shutil.copyfile(os.path.join(sdir, m["head"]["graph"]), os.path.join(tmp, m["head"]["graph"]))
        out = dict(m, name=name, version=int(version), slots=slots)
        out["description"] = description or f"{src}@{src_version} pruned to {len(kept_all)} of " \
                                             f"{len(m['adapter'].get('adapters', []))} adapters"
        out["adapter"] = dict(m["adapter"], adapters=kept_all,
                              pruned_from={"task": src, "version": int(src_version), **(pruning or {})})
        return out

    return install_task_version(repo, name, version, force, build)


def rank(weights: dict, k: int, mode: str) -> dict:
    """weights: "layer:location" -> {adapter: average fusion weight}. Returns "layer:location" -> kept
    names: the k highest per slot (`per-layer`), or the k highest mean over all slots (`global`)."""
    if k < 1:
        raise ExportError(f"--keep must be >= 1, got {k}")
    if mode == "per-layer":
        return {key: [n for n, _ in sorted(w.items(), key=lambda kv: (-kv[1], kv[0]))[:k]] for key, w in weights.items()}
    if mode != "global":
        raise ExportError(f"mode {mode!r} is neither per-layer nor global")
    names = sorted({n for w in weights.values() for n in w})
    mean = {n: sum(w.get(n, 0.0) for w in weights.values()) / len(weights) for n in names}
    top = [n for n, _ in sorted(mean.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
    return {key: [n for n in w if n in top] for key, w in weights.items()}


__all__ = ["write_fusion_task", "prune_task", "rank", "read_task", "latest_version", "Adapter"]
