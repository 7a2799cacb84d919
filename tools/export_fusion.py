#!/usr/bin/env python3
"""Export an AdapterHub AdapterFusion (adapter_fusion_config.json + model_adapter_fusion.safetensors)
with its fused adapters and head as a fusion task of a model repository (models/README.md, "Fusion tasks").

Usage:
  export_fusion.py --repo REPO --backbone NAME --fusion DIR --adapter DIR [--adapter DIR ...] [--head DIR]
                   --name TASK --version N (--drop-first n | --drop-layers 0,2 | --robust default,min,max)
                   [--checkpoint BACKBONE_DIR] [--description TEXT] [--graph-form reassociated|library] [--force]

Every adapter named in the fusion's adapter_names must be given with --adapter (matched by the name in
its adapter_config.json). --head defaults to --fusion (where the library saves the fusion model's head).
Supported: "dynamic" and "static" fusion and their variants (query/key/value on or off,
query_before_ln, residual_before, value_before_softmax); temperature=true is refused. Fused adapters
must share original_ln_before/after and residual_before_ln. Errors exit 2 and write nothing.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools import ExportError, InvalidCheckpoint  # noqa: E402
from adapterdrop_tools.adapterhub import load_adapter, load_head  # noqa: E402
from adapterdrop_tools.checkpoint import load_checkpoint  # noqa: E402
from adapterdrop_tools.fusion import FORMS, load_fusion  # noqa: E402
from adapterdrop_tools.fusion_task import write_fusion_task  # noqa: E402
from adapterdrop_tools.repository import RepoLayerNorms, parse_drop, read_backbone  # noqa: E402
from export_task import _ints  # noqa: E402


def export(a) -> str:
    bb = read_backbone(a.repo, a.backbone)
    L, H = int(bb["num_layers"]), int(bb["hidden_size"])
    lns = load_checkpoint(a.checkpoint) if a.checkpoint else RepoLayerNorms(a.repo, a.backbone)
    if a.checkpoint and (lns.num_layers != L or lns.hidden_size != H):
        raise InvalidCheckpoint(f"--checkpoint {a.checkpoint} does not match backbone {a.backbone!r} ({L} layers, hidden {H})")
    fusion = load_fusion(a.fusion, L, H)
    adapters = {}
    for d in a.adapter:
        ad = load_adapter(d, L, H)
        if ad.name in adapters:
            raise ExportError(f"adapter {ad.name!r} given twice")
        adapters[ad.name] = ad
    missing = [n for n in fusion.adapter_names if n not in adapters]
    if missing:
        raise ExportError(f"fusion {fusion.name!r} fuses {fusion.adapter_names}; give --adapter for {missing}")
    head = load_head(a.head or a.fusion, H)
    robust = _ints(a.robust, "--robust") if a.robust is not None else None
    if robust is not None and len(robust) != 3:
        raise ExportError("--robust takes default,min,max")
    drop = parse_drop(L, a.drop_first, _ints(a.drop_layers, "--drop-layers") if a.drop_layers is not None else None, robust)
    return write_fusion_task(a.repo, a.backbone, fusion, adapters, head, lns, a.name, a.version, drop, a.description,
                             a.force, a.graph_form)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--fusion", required=True, help="dir with adapter_fusion_config.json + fusion weights")
    p.add_argument("--adapter", required=True, action="append", help="a fused adapter's dir (repeat for each)")
    p.add_argument("--head", help="dir with head_config.json + model_head.safetensors (default: --fusion)")
    p.add_argument("--checkpoint", help="backbone checkpoint dir (LayerNorm weights); default: from REPO")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True, type=int)
    d = p.add_mutually_exclusive_group(required=True)
    d.add_argument("--drop-first", type=int)
    d.add_argument("--drop-layers")
    d.add_argument("--robust")
    p.add_argument("--description")
    p.add_argument("--graph-form", choices=FORMS, default="reassociated",
                   help="reassociated (default): the same numbers with K/V applied once per token, not per adapter; "
                        "library: per-adapter K/V projections as the library computes them (slower)")
    p.add_argument("--force", action="store_true")
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
