#!/usr/bin/env python3
"""Export an AdapterHub bottleneck adapter + classification head as a task of a model repository.

Usage:
  export_task.py --repo REPO --backbone NAME --adapter DIR [--head DIR] --name TASK --version N
                 (--drop-first n | --drop-layers 0,2 | --robust default,min,max)
                 [--checkpoint BACKBONE_DIR] [--description TEXT] [--force]

The backbone must already be in REPO (export_backbone.py). Its LayerNorm weights, baked into every
adapter slot, are read from --checkpoint if given, else from the backbone's plain slot graphs in REPO.
--head defaults to --adapter (AdapterHub saves head_config.json next to the adapter).
Unsupported methods fail with 'UnsupportedAdapter: ...' and exit 2, writing nothing.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools import ExportError, InvalidCheckpoint  # noqa: E402
from adapterdrop_tools.adapterhub import load_adapter, load_head  # noqa: E402
from adapterdrop_tools.checkpoint import load_checkpoint  # noqa: E402
from adapterdrop_tools.repository import RepoLayerNorms, parse_drop, read_backbone, write_task  # noqa: E402


def _ints(text: str, what: str) -> list:
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise ExportError(f"{what} must be comma-separated integers, got {text!r}") from None


def export(a) -> str:
    bb = read_backbone(a.repo, a.backbone)
    L, H = int(bb["num_layers"]), int(bb["hidden_size"])
    if a.checkpoint:
        lns = load_checkpoint(a.checkpoint)
        if lns.num_layers != L or lns.hidden_size != H:
            raise InvalidCheckpoint(f"--checkpoint {a.checkpoint} ({lns.num_layers} layers, hidden "
                                    f"{lns.hidden_size}) does not match backbone {a.backbone!r} ({L}, {H})")
    else:
        lns = RepoLayerNorms(a.repo, a.backbone)
    adapter = load_adapter(a.adapter, L, H)
    head = load_head(a.head or a.adapter, H)
    robust = None
    if a.robust is not None:
        robust = _ints(a.robust, "--robust")
        if len(robust) != 3:
            raise ExportError("--robust takes default,min,max")
    drop = parse_drop(L, a.drop_first, _ints(a.drop_layers, "--drop-layers") if a.drop_layers is not None else None,
                      robust)
    return write_task(a.repo, a.backbone, adapter, head, lns, a.name, a.version, drop, a.description, a.force,
                      a.with_up, getattr(a, "threshold", None))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--adapter", required=True, help="AdapterHub adapter dir (adapter_config.json + weights)")
    p.add_argument("--head", help="dir with head_config.json + model_head.safetensors (default: --adapter)")
    p.add_argument("--checkpoint", help="backbone checkpoint dir (LayerNorm weights); default: from REPO")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True, type=int)
    d = p.add_mutually_exclusive_group(required=True)
    d.add_argument("--drop-first", type=int, help="specialized AdapterDrop: no adapters in layers 0..n-1")
    d.add_argument("--drop-layers", help="no adapters in these layers, e.g. 0,2")
    d.add_argument("--robust", help="robust AdapterDrop: default,min,max, e.g. 0,0,6")
    p.add_argument("--description")
    p.add_argument("--threshold", type=float, help="multi-label heads: score above which a label is predicted (default 0.5)")
    p.add_argument("--force", action="store_true", help="replace an existing task version")
    p.add_argument("--with-up", action="store_true",
                   help="also write the adapter's output graphs, so fusion tasks over the same adapter share its compute")
    a = p.parse_args(argv)
    try:
        out = export(a)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
