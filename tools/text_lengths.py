"""Token lengths of the real texts (the test splits of the three trained tasks, tokenized with a
backbone's tokenizer), one a line: the workload of `cargo bench --bench banks` "Packed tokens"
(`BENCH_LENGTHS`). Usage: text_lengths.py --repo build/test-repo [--backbone minilm] --out FILE"""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer

from adapterdrop_tools import datasets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repo", required=True)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    tok = Tokenizer.from_file(str(Path(a.repo) / "backbones" / a.backbone / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    texts = [t for task in datasets.TASKS for t in datasets.load_splits(task)["test"].texts]
    lens = [len(e.ids) for e in tok.encode_batch(texts)]
    Path(a.out).write_text("\n".join(map(str, lens)) + "\n")
    print(f"{len(lens)} texts, mean {sum(lens) / len(lens):.1f}, max {max(lens)} tokens -> {a.out}")


if __name__ == "__main__":
    main()
