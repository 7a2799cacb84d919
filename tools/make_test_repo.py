#!/usr/bin/env python3
"""Build the test model repository for the Rust integration tests and pytest.

Usage: make_test_repo.py --out DIR [--with-minilm]

Backbones: bert-tiny (adapterhub-tiny fixture, tokenizer), roberta-tiny (ids only), tiny-random
(seeded random BERT from make_fixtures, tokenizer) and with --with-minilm: minilm (all-MiniLM-L6-v2).
Tasks (all version 1):
  bert-tiny:    sent (Pfeiffer), topic (Houlsby), score (regression): robust 0..2, default 0;
                sent-spec (drop_first 1), sent-layers (layers [1]; layer-1 slots absent)
  roberta-tiny: rsent robust 0..2
  tiny-random:  rand-pfeiffer, rand-houlsby robust 0..3
  minilm:       mini-pfeiffer, mini-houlsby robust 0..6
DIR/sources/ holds the generated checkpoints/adapters; DIR/expected.json holds inputs and the numpy
reference logits. The whole DIR is rebuilt in a sibling temp dir and swapped in (idempotent).

expected.json shape (see adapterdrop_tools/testrepo.py for the commented version):
{"format": 1, "tolerance": 1e-4,
 "backbones": {"bert-tiny": {"architecture": "bert", "num_layers": 2, "tokenizer": true, "pad_token_id": 0}, ...},
 "tasks": {"sent": {"backbone": "bert-tiny", "version": 1, "num_layers": 2, "kind": "classification",
                    "labels": ["negative", "positive"], "drop": {"robust": {"default": 0, "min": 0, "max": 2}},
                    "cases": [{"name": "texts" | "pairs" | "ids",
                               "input_ids": [[101, ...], ...],        # unpadded, varying lengths
                               "attention_mask": [[1, ...], ...],     # all ones, same lengths
                               "token_type_ids": [[0, ...], ...],     # same lengths
                               "texts": [...] | null, "pairs": [[a, b], ...] | null,
                               "logits": {"0": [[...], ...], "1": ..., "2": ...},   # by drop n
                               "default_logits": [[...], ...]}]}, ...}}
"logits" keys: robust tasks min..max; drop_first tasks only their n; "layers" tasks {}.
Regression tasks have kind "regression", labels [] and one logit per row.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools.repository import run_build  # noqa: E402
from adapterdrop_tools.testrepo import build  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--with-minilm", action="store_true")
    a = p.parse_args(argv)
    return run_build(lambda: build(a.out, a.with_minilm))


if __name__ == "__main__":
    sys.exit(main())
