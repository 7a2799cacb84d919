#!/usr/bin/env python3
"""Write seeded random test fixtures in the Hugging Face / AdapterHub file layouts.

Usage: make_fixtures.py --out DIR [--seed S]

  DIR/tiny-random/backbone/            BERT, 3 layers, hidden 32, 4 heads, FFN 64, vocab 30522 (+ tokenizer.json)
  DIR/tiny-random/adapters/rand-pfeiffer   seq_bn, rf 8, relu, head 2 labels (adapter name pf_rand)
  DIR/tiny-random/adapters/rand-houlsby    double_seq_bn, rf 4, swish, head 3 labels (adapter name hb_rand)
  DIR/minilm/adapters/mini-pfeiffer        seq_bn for all-MiniLM-L6-v2 (hidden 384, 6 layers), rf 16, relu
  DIR/minilm/adapters/mini-houlsby         double_seq_bn for MiniLM, rf 32, swish
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools.fixtures import make_all  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    for name, path in make_all(a.out, a.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
