"""The real tagging task (issue 14): Turkish part-of-speech tags (UPOS) from Google's Turkish Web Treebank.

The sentences are never committed: they are read at run time out of the PyPI wheel
turkish-treebanks==1.0.0 (Apache-2.0), installed with --no-deps; only its data file is read
(`data/web.conllu` at the top of site-packages, ~2,540 forum/blog sentences), the package is never imported.

Words. The treebank splits a Turkish word into inflectional groups (IGs) joined by `SpaceAfter=No`
(`Açık|la|nma|yan`); the word's part of speech is its last IG's (UD convention). A *treebank word* here is a
run of tokens joined by `SpaceAfter=No` in which no token is PUNCT, labelled with the last token's UPOS; the
sentence text is the tokens joined as `SpaceAfter` says. The server's word view is the tokenizer's word
(BERT pre-tokenizer: whitespace and punctuation split), labelled by its first sub-token; a tokenizer word
that starts where a treebank word starts carries that word's tag (`gold_at` maps start character -> tag).
The few tokenizer words that start inside a treebank word (`Şubat-Mart` -> `Şubat`, `-`, `Mart`) are not
labelled: -100 in training, not scored in evaluation.

Splits are lists of sent_ids from a seeded shuffle; models/trained/splits_tagging.json records sizes, seed
and a sha256 of every id list, and `check_recorded` refuses to go on if the data or this code changed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import sysconfig
from dataclasses import dataclass

from .datasets import DataUnavailable

TASK = "pos-tr"
SEED = 20211107
PACKAGE = "turkish-treebanks==1.0.0"
DATA_FILE = os.path.join("data", "web.conllu")
LABELS = ["ADJ", "ADP", "ADV", "AFFIX", "CONJ", "DET", "NOUN", "NUM", "ONOM", "PRON", "PRT", "PUNCT", "VERB", "X"]
SIZES = (1841, 200, 500)  # train, dev, test
RECORD = os.path.join(os.path.dirname(__file__), "..", "..", "models", "trained", "splits_tagging.json")


@dataclass
class Sentence:
    sent_id: str
    text: str
    words: list  # [(start, end, upos)] treebank words, character ranges of `text`

    def gold_at(self) -> dict:
        """{start character: tag index} of every treebank word."""
        return {s: LABELS.index(tag) for s, _, tag in self.words}


@dataclass
class Split:
    name: str
    sentences: list

    @property
    def texts(self) -> list:
        return [s.text for s in self.sentences]


def data_path() -> str:
    """The CoNLL-U file of the installed wheel (site-packages/data/web.conllu)."""
    for key in ("purelib", "platlib"):
        path = os.path.join(sysconfig.get_paths()[key], DATA_FILE)
        if os.path.isfile(path):
            return path
    raise DataUnavailable(f"{DATA_FILE} not found in site-packages; `pip install --no-deps {PACKAGE}` (or `make setup`)")


def read_conllu(path: str) -> list:
    """[(sent_id, [(form, upos, space_after)])] of a CoNLL-U file; multi-word and empty-node lines skipped."""
    out, sent_id, toks = [], None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("# sent_id"):
                sent_id = line.split("=", 1)[1].strip()
            elif not line.strip():
                if toks:
                    out.append((sent_id, toks))
                sent_id, toks = None, []
            elif not line.startswith("#"):
                cols = line.split("\t")
                if len(cols) != 10 or not cols[0].isdigit():
                    continue
                toks.append((cols[1], cols[3], "SpaceAfter=No" not in cols[9].split("|")))
    if toks:
        out.append((sent_id, toks))
    return out


def to_sentence(sent_id: str, toks: list) -> Sentence:
    """Text and treebank words (IG runs merged, last IG's tag) of one CoNLL-U sentence."""
    text, words = "", []
    for i, (form, upos, space) in enumerate(toks):
        start = len(text)
        text += form
        glued = i > 0 and not toks[i - 1][2] and upos != "PUNCT" and toks[i - 1][1] != "PUNCT"
        if glued:
            s, _, _ = words[-1]
            words[-1] = (s, len(text), upos)
        else:
            words.append((start, len(text), upos))
        if space and i + 1 < len(toks):
            text += " "
    unknown = {w[2] for w in words} - set(LABELS)
    if unknown:
        raise ValueError(f"{sent_id}: tags {sorted(unknown)} outside {LABELS}")
    return Sentence(sent_id, text, words)


@functools.lru_cache(maxsize=None)
def _pool() -> tuple:
    return tuple(to_sentence(i, t) for i, t in read_conllu(data_path()))


def _hash(ids: list) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def load_splits() -> dict:
    """{'train', 'dev', 'test'}: Split, deterministic."""
    pool = list(_pool())
    random.Random(SEED).shuffle(pool)
    n_train, n_dev, n_test = SIZES
    if n_train + n_dev + n_test > len(pool):
        raise DataUnavailable(f"{TASK}: {len(pool)} sentences, splits need {n_train + n_dev + n_test}")
    return {"test": Split("test", pool[:n_test]), "dev": Split("dev", pool[n_test:n_test + n_dev]),
            "train": Split("train", pool[n_test + n_dev:n_test + n_dev + n_train])}


def describe() -> dict:
    splits = load_splits()
    return {TASK: {"data": f"{PACKAGE} {DATA_FILE}", "labels": LABELS, "seed": SEED, "splits": {
        name: {"size": len(s.sentences), "ids_sha256": _hash([x.sent_id for x in s.sentences]),
               "words": sum(len(x.words) for x in s.sentences)} for name, s in splits.items()}}}


def write_record(path: str = RECORD) -> dict:
    rec = describe()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=2)
        f.write("\n")
    return rec


def check_recorded(path: str = RECORD) -> dict:
    """load_splits(), after checking each split's id hash against splits_tagging.json."""
    with open(path, encoding="utf-8") as f:
        want = json.load(f)[TASK]["splits"]
    splits = load_splits()
    for name, s in splits.items():
        got = _hash([x.sent_id for x in s.sentences])
        if got != want[name]["ids_sha256"]:
            raise DataUnavailable(f"{TASK}/{name}: split ids hash {got} != recorded {want[name]['ids_sha256']} ({path});"
                                  " the data or datasets_tagging.py changed")
    return splits


if __name__ == "__main__":
    print(json.dumps(write_record(), indent=2))
