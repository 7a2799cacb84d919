#!/usr/bin/env python3
"""Export the issue-14 library fixtures (tests/fixtures/adapterhub-breadth) into a model repository for
the Rust exactness test `tests/breadth_exactness.rs`.

Usage: make_breadth_repo.py --out DIR [--fixtures DIR]

Backbones (named as the fixture directories): bert, roberta, xlm-roberta, distilbert, electra, each with
its tokenizer. Tasks per backbone <b>, robust AdapterDrop 0..num_layers, default 0:
  <b>-pfeiffer (seq_bn), <b>-houlsby (double_seq_bn), <b>-pairs (seq_bn, gelu; sentence pairs),
  <b>-multilabel (multi-label head), <b>-choice (multiple-choice head); and every backbone's built-in
  <b>/embedding task (mean pooling, not normalised: the fixtures' checkpoints have no sentence-transformers config)
The expected outputs are the library's own (the fixtures' reference.json), not recomputed here.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools.adapterhub import load_adapter, load_head  # noqa: E402
from adapterdrop_tools.checkpoint import load_checkpoint  # noqa: E402
from adapterdrop_tools.repository import build_dir_atomically, parse_drop, write_backbone, write_task, run_build  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "adapterhub-breadth")
BACKBONES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra")
SERVED = {"pfeiffer": "pfeiffer", "houlsby": "houlsby", "pairs": "pfeiffer_pairs",  # task suffix -> fixture
          "multilabel": "multilabel", "choice": "choice"}


def fill(repo: str, fixtures: str) -> None:
    for b in BACKBONES:
        src = os.path.join(fixtures, b)
        ck = load_checkpoint(os.path.join(src, "backbone"))
        write_backbone(ck, repo, b, None, f"tests/fixtures/adapterhub-breadth/{b} (adapters library, random)",
                       "Apache-2.0", capturable=True)  # the suites also run on runtime.layer_graph = "capturable"
        drop = parse_drop(ck.num_layers, robust=(0, 0, ck.num_layers))
        for suffix, fixture in SERVED.items():
            adir = os.path.join(src, "adapters", fixture)
            adapter = load_adapter(adir, ck.num_layers, ck.hidden_size)
            head = load_head(adir, ck.hidden_size)
            write_task(repo, b, adapter, head, ck, f"{b}-{suffix}", 1, drop,
                       f"breadth fixture {b}/{fixture}: {adapter.method} adapter")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--fixtures", default=FIXTURES)
    a = p.parse_args(argv)
    return run_build(lambda: build_dir_atomically(a.out, lambda tmp: fill(tmp, a.fixtures)))


if __name__ == "__main__":
    sys.exit(main())
