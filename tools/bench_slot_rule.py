#!/usr/bin/env python3
"""What the dispatched slot rule (graphs_rule.py, issue 12 "slotrule") saves against the general
form alone: the same MiniLM `layer.onnx` built both ways from the checkpoint, the same packed rows
and banks, ABAB rounds in one process (ONNX Runtime only, the server's CPU session options), medians
of the per-round ratios; every case also checks that both graphs give the same bits. With one
intra-op thread ONNX Runtime runs every kernel on the calling thread, so the thread's CPU time is
also reported: on a loaded machine it leaves out the time the thread waited for a core.

Usage: bench_slot_rule.py [--layer 2] [--b 8] [--t 64] [--rounds 21] [--threads 1]
       bench_slot_rule.py --general-copy SRC DST [--seed 4321]
`--general-copy`: DST = the repository SRC (hard links) with every MiniLM and bench BERT-base
(`make_bench_repo.py`, its seed) `layer.onnx` rewritten in the general form, so the Rust benches can
time the server on both side by side (`BENCH_BEFORE_REPO`, `benches/banks.rs`, `benches/banks_scale.rs`).
Cases (rows of the batch -> bank rows, attention / FFN slot):
  plain        every row on bank row 0 (n = L: AdapterDrop drops every adapter)
  pfeiffer     one Pfeiffer task (relu, rf 16, FFN slot only), the issue's one-task case
  houlsby      one Houlsby task (swish, rf 16, both slots, no LayerNorm before)
  8 pfeiffer   8 distinct Pfeiffer tasks, row r on task r
  mixed        Pfeiffer, Houlsby, a gelu post_add adapter and plain rows in one batch (the fallback)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adapterdrop_tools.adapterhub import Adapter, SlotWeights  # noqa: E402
from adapterdrop_tools.checkpoint import load_checkpoint, minilm_path  # noqa: E402
from adapterdrop_tools.graphs_layer import (attention_maps, bank, layer_graph, methods_maps, no_stack_rows,  # noqa: E402
                                            pack_maps)
from adapterdrop_tools.graphs_methods import methods_bank  # noqa: E402


def session(model, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["SkipLayerNormFusion"])


def adapter(rng, H: int, act: str, lnb: bool, res, locations, name: str):
    """An adapter config with random weights (rf 16) at `locations`, as `(Adapter, {loc: SlotWeights})`."""
    r = max(1, H // 16)
    a = Adapter(name=name, method="seq_bn", hidden_size=H, non_linearity=act, non_linearity_name=act,
                reduction_factor=16, original_ln_before=lnb, original_ln_after=True, residual_before_ln=res,
                scaling=1.0, leave_out=[], locations=locations, slots={})
    return a, {loc: SlotWeights(*(rng.standard_normal(s).astype(np.float32) * 0.1 for s in ((r, H), (r,), (H, r), (H,))))
               for loc in locations}


def case_feeds(H: int, ffn: int, B: int, T: int, tasks: list, row_task: list) -> dict:
    """Packed rows of T tokens; row r uses `tasks[row_task[r]]` (None: plain) at each slot it has."""
    rng = np.random.default_rng(5)
    lens, rows = [T] * B, list(range(B))
    f = {"hidden": rng.standard_normal((B * T, H)).astype(np.float32), **attention_maps(lens, np.ones((B, T), np.int64))}
    for loc in ("attention", "ffn"):
        entries, index = [], []
        for t in tasks:
            entries.append(None if t is None or loc not in t[1] else (t[0], t[1][loc]))
        f.update({f"{loc}.{k}": v for k, v in bank(entries, H).items()})
        for r in rows:
            t = tasks[row_task[r]]
            index.append(0 if t is None or loc not in t[1] else row_task[r] + 1)
        f.update({f"{loc}_{k}": v for k, v in pack_maps(lens, rows, index).items()})
    f.update(methods_bank([], H, ffn))
    f.update(methods_maps(lens, [0] * B, rows))
    f.update(no_stack_rows(f, H))
    return f


def cases(H: int, B: int):
    rng = np.random.default_rng(11)
    pf = [adapter(rng, H, "relu", True, True, ("ffn",), f"pf{k}") for k in range(max(8, B))]
    hb = adapter(rng, H, "silu", False, True, ("attention", "ffn"), "houlsby")
    odd = adapter(rng, H, "gelu", True, "post_add", ("attention", "ffn"), "odd")
    return {
        "plain": ([None], [0] * B),
        "pfeiffer": ([pf[0]], [0] * B),
        "houlsby": ([hb], [0] * B),
        "8 pfeiffer": (pf[:8], [r % 8 for r in range(B)]),
        "mixed": ([pf[0], hb, odd, None], [r % 4 for r in range(B)]),
    }


def spread(a: list, b: list) -> str:
    """Median of the per-round ratios a / b, bold, then its p10-p90 range."""
    r = sorted(x / y for x, y in zip(a, b))
    return f"**{statistics.median(r):.3f}** | {r[len(r) // 10]:.3f}-{r[(len(r) * 9) // 10]:.3f}"


def general_copy(src: str, dst: str, seed: int) -> None:
    """See the module doc."""
    import shutil
    import tempfile

    from adapterdrop_tools.onnx_builder import save
    from make_bench_repo import bert_base_checkpoint

    shutil.copytree(src, dst, copy_function=os.link)
    for name in sorted(os.listdir(os.path.join(dst, "backbones"))):
        d = os.path.join(dst, "backbones", name)
        if name == "minilm":
            ck = load_checkpoint(minilm_path())
        elif name == "bert-base-random":
            ck = load_checkpoint(bert_base_checkpoint(tempfile.mkdtemp(), seed))
        else:
            continue
        for i in range(ck.num_layers):
            path = os.path.join(d, "layers", str(i), "layer.onnx")
            os.unlink(path)  # a hard link to SRC's file
            save(layer_graph(ck, i, dispatch=False), path)
        print(f"{d}: {ck.num_layers} layer graphs in the general form", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--b", type=int, default=8)
    p.add_argument("--t", type=int, default=64)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--general-copy", nargs=2, metavar=("SRC", "DST"))
    p.add_argument("--seed", type=int, default=4321, help="make_bench_repo.py's seed (--general-copy)")
    a = p.parse_args(argv)
    if a.general_copy:
        general_copy(*a.general_copy, a.seed)
        return 0
    ck = load_checkpoint(minilm_path())
    H, ffn = ck.hidden_size, ck.intermediate_size
    general = session(layer_graph(ck, a.layer, dispatch=False), a.threads)
    dispatched = session(layer_graph(ck, a.layer), a.threads)
    print(f"## Slot rule: dispatched vs general layer.onnx, MiniLM layer {a.layer}, B = {a.b}, T = {a.t}, "
          f"{a.threads} thread(s), {a.rounds} ABAB rounds\n")
    print("| case | general ms | dispatched ms | dispatched / general (median of per-round ratios) | spread (p10-p90) | "
          "CPU time: dispatched / general | spread | same bits |\n|---|---|---|---|---|---|---|---|")
    for name, (tasks, row_task) in cases(H, a.b).items():
        f = case_feeds(H, ffn, a.b, a.t, tasks, row_task)
        same = np.array_equal(general.run(["y"], f)[0], dispatched.run(["y"], f)[0])
        tg, td, cg, cd = [], [], [], []
        for _ in range(a.rounds):
            for s, wall, cpu in ((general, tg, cg), (dispatched, td, cd)):
                t0, c0 = time.perf_counter(), time.thread_time()
                s.run(["y"], f)
                wall.append((time.perf_counter() - t0) * 1e3)
                cpu.append((time.thread_time() - c0) * 1e3)
        print(f"| {name} | {statistics.median(tg):.2f} | {statistics.median(td):.2f} | {spread(td, tg)} | "
              f"{spread(cd, cg)} | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
