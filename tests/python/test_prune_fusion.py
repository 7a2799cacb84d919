"""tools/prune_fusion.py against the real server: it ranks fused adapters by the served fusion
weights, and the pruned task it writes equals the numpy reference run over the kept adapters."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from adapterdrop_tools.adapterhub import load_adapter, load_head  # noqa: E402
from adapterdrop_tools.checkpoint import load_checkpoint  # noqa: E402
from adapterdrop_tools.fusion import load_fusion  # noqa: E402
from adapterdrop_tools.pipeline import Pipeline  # noqa: E402
from adapterdrop_tools.reference import Reference, fusion_logits  # noqa: E402
from adapterdrop_tools.testrepo import as_arrays  # noqa: E402


def _repo_copy(src: Path, dst: Path) -> Path:
    for sub in ("backbones/tiny-random", "tasks/fusion-static", "sources/tiny-random"):
        shutil.copytree(src / sub, dst / sub)
    shutil.copyfile(src / "expected.json", dst / "expected.json")
    return dst


def _expected_ranking(expected, task, n):
    """Token-weighted average of the reference fusion weights over the task's cases."""
    sums, toks = {}, {}
    for c in expected["tasks"][task]["cases"]:
        t = sum(len(s) for s in c["input_ids"])
        for key, w in c["fusion_weights"][str(n)].items():
            sums[key] = sums.get(key, 0) + np.asarray(w) * t
            toks[key] = toks.get(key, 0) + t
    return {k: sums[k] / toks[k] for k in sums}


def _run(server, repo, *args):
    cmd = [sys.executable, str(ROOT / "tools" / "prune_fusion.py"), "--server", server.addr, "--repo", str(repo),
           "--task", "fusion-static", "--test-repo-inputs", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["per-layer", "global"])
def test_prune_tool_ranks_by_served_weights_and_writes_an_exact_task(server, expected, tmp_path, mode):
    repo = _repo_copy(Path(os.environ.get("ADAPTERDROP_TEST_REPO", ROOT / "build" / "test-repo")), tmp_path / "repo")
    out = _run(server, repo, "--keep", "1", "--mode", mode, "--name", "static-top1", "--weights-out", str(tmp_path / "w.json"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "w.json").read_text())
    names = expected["tasks"]["fusion-static"]["fusion"]["slots"]
    want = _expected_ranking(expected, "fusion-static", 0)
    for key, avg in want.items():
        served = [report["weights"][key][n] for n in names[key]]
        assert np.abs(np.asarray(served) - avg).max() <= 1e-4, key
    if mode == "per-layer":
        for key, avg in want.items():
            assert report["kept"][key] == [names[key][int(np.argmax(avg))]], key
    else:
        assert len({tuple(v) for v in report["kept"].values()}) == 1
    m = json.loads((repo / "tasks" / "static-top1" / "1" / "task.json").read_text())
    assert m["adapter"]["pruned_from"]["task"] == "fusion-static" and m["adapter"]["pruned_from"]["mode"] == mode
    # The written task equals the reference over the kept adapters (same fusion weights), every depth.
    src = repo / "sources" / "tiny-random"
    ref = Reference(load_checkpoint(str(src / "backbone")))
    fusion = load_fusion(str(src / "fusion-static"), 3, 32)
    adapters = {a.name: a for a in (load_adapter(str(src / "adapters" / d), 3, 32) for d in ("rand-houlsby", "hb-two"))}
    head = load_head(str(src / "fusion-static"), 32)
    keep = {(int(k.split(":")[0]), k.split(":")[1]): v for k, v in report["kept"].items()}
    pipe = Pipeline(str(repo), "static-top1", 1)
    case = expected["tasks"]["fusion-static"]["cases"][0]
    ids, mask, tt = as_arrays(case)
    for n in range(4):
        want_logits = fusion_logits(ref, ids, mask, tt, fusion, adapters, head, keep, range(n))
        assert np.abs(pipe.logits(ids, mask, tt, range(n)) - want_logits).max() <= 1e-4, n
    # A second run without --force refuses to overwrite.
    again = _run(server, repo, "--keep", "1", "--name", "static-top1")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_prune_tool_reports_unknown_task_and_bad_k(server, tmp_path):
    repo = _repo_copy(Path(os.environ.get("ADAPTERDROP_TEST_REPO", ROOT / "build" / "test-repo")), tmp_path / "repo")
    bad = _run(server, repo, "--keep", "0", "--name", "x")
    assert bad.returncode == 2 and "--keep" in bad.stderr
    cmd = [sys.executable, str(ROOT / "tools" / "prune_fusion.py"), "--server", server.addr, "--repo", str(repo),
           "--task", "nope", "--test-repo-inputs", "--keep", "1", "--name", "x"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "nope" in out.stderr
