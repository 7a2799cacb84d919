"""Write backbones and tasks into a model repository (format v1, models/README.md), atomically."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time

from . import ExportError, InvalidCheckpoint
from .adapterhub import Adapter, Head, copy_adapterhub
from .checkpoint import Checkpoint
from .graphs_backbone import (attention_graph, embedding_size, embeddings_graph, embeddings_project_graph, ffn_graph,
                              plain_slot_graph, projects_embeddings)
from .graphs_layer import layer_graph
from .graphs_task import adapter_slot_graph, head_graph
from .onnx_builder import initializers, save

FORMAT_VERSION = 1
ADAPTERHUB_DIR = "adapterhub"  # the task's AdapterHub files, which the server loads into its adapter banks
# The layer graph without control flow (graphs_layer.layer_graph(capturable=True)), beside layer.onnx in
# every layers/<i>, when exported with --capturable-layers; backbone.json `capturable_layer` names it.
CAPTURABLE_LAYER = "layer_capturable.onnx"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise ExportError(f"invalid {kind} name {name!r} (must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}, no '..')")
    return name


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _atomic_install(tmp: str, final: str, force: bool) -> None:
    """Move the finished temp dir `tmp` to `final` (same filesystem: a rename)."""
    if os.path.exists(final):
        if not force:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ExportError(f"{final} already exists (use --force to replace it)")
        old = os.path.join(os.path.dirname(tmp), f".old-{os.getpid()}-{os.path.basename(final)}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(tmp, final)


def build_dir_atomically(out: str, fill) -> str:
    """Run `fill(tmp)` on a sibling temp dir, then swap it in for `out`; a failure leaves `out` as it was."""
    out = os.path.abspath(out).rstrip(os.sep)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_install(tmp, out, force=True)
    return out


def _fresh_tmp(parent: str, label: str) -> str:
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{label}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def install_task_version(repo: str, name: str, version: int, force: bool, build) -> str:
    """Write one task version as the server expects it: `build(tmp)` fills a fresh hidden staging
    directory and returns the manifest, which goes to task.json; then the directory is renamed into
    place as tasks/<name>/<version>. Any failure leaves the repository as it was."""
    final = os.path.join(repo, "tasks", name, str(int(version)))
    if os.path.exists(final) and not force:
        raise ExportError(f"{final} already exists (use --force to replace it)")
    tmp = _fresh_tmp(os.path.join(repo, "tasks"), f"{name}-{version}")
    try:
        write_json(os.path.join(tmp, "task.json"), build(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_install(tmp, final, force)
    return final


def kept_slots(slots: dict, drop: dict, num_layers: int, what: str):
    """(layer, location, value) of `slots` in order, without the layers `drop` always skips; a layer
    the backbone does not have is an error naming `what` ("adapter", "fusion")."""
    skip = always_dropped(drop, num_layers)
    for (layer, loc), value in sorted(slots.items()):
        if layer in skip:
            continue
        if layer >= num_layers:
            raise InvalidCheckpoint(f"{what} has layer {layer}, backbone has {num_layers} layers")
        yield layer, loc, value


# ---- backbones ------------------------------------------------------------------------------
def backbone_manifest(ck: Checkpoint, name: str, tokenizer: bool, source: str | None, license: str | None,
                      capturable: bool = False) -> dict:
    m = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "architecture": ck.architecture,
        "num_layers": ck.num_layers,
        "hidden_size": ck.hidden_size,
        "num_heads": ck.num_heads,
        "intermediate_size": ck.intermediate_size,
        "vocab_size": int(ck.config["vocab_size"]),
        "type_vocab_size": ck.type_vocab_size,
        "max_positions": ck.max_positions,
        "pad_token_id": ck.pad_token_id,
        "layer_norm_eps": ck.eps,
        "tokenizer": "tokenizer.json" if tokenizer else None,
        "slots": ["attention", "ffn"],
        "source": source or "unknown",
        "license": license or "unknown",  # strings: the server's manifest parser rejects null here
        "embedding": embedding_config(ck.path),
    }
    if projects_embeddings(ck):  # ELECTRA: `embedded` [B,T,E] and embeddings_project.onnx (models/README.md)
        m["embedding_size"] = embedding_size(ck)
    if capturable:  # runtime.layer_graph = "capturable" / runtime.cuda_graphs read these
        m["capturable_layer"] = CAPTURABLE_LAYER
    return m


# sentence-transformers pooling modes -> the built-in embedding task's `pooling`
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def embedding_config(path: str) -> dict:
    """How the backbone's built-in embedding task pools (backbone.json `embedding`): what the
    checkpoint's sentence-transformers modules say (`modules.json`: its Pooling module's config,
    `1_Pooling/config.json` by default, and whether a Normalize module follows), else mean pooling,
    not normalised (sentence-transformers' default for a plain Hugging Face model)."""
    pooling_dir, normalize = "1_Pooling", False
    modules_path = os.path.join(path, "modules.json")
    if os.path.isfile(modules_path):
        with open(modules_path, encoding="utf-8") as f:
            for m in json.load(f):
                kind = str(m.get("type", "")).rsplit(".", 1)[-1]
                if kind == "Pooling":
                    pooling_dir = m.get("path") or pooling_dir
                elif kind == "Normalize":
                    normalize = True
                elif kind != "Transformer":
                    raise ExportError(f"{modules_path}: sentence-transformers module {m.get('type')!r} is not supported "
                                      "(the server computes Transformer, Pooling (mean or cls) and Normalize)")
    pooling = "mean"
    cfg_path = os.path.join(path, pooling_dir, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v)
        if len(modes) != 1 or modes[0] not in POOLING_MODES:
            raise ExportError(f"{cfg_path}: pooling {modes} is not supported (exactly one of {sorted(POOLING_MODES)})")
        pooling = POOLING_MODES[modes[0]]
    return {"pooling": pooling, "normalize": normalize}


def write_backbone(ck: Checkpoint, repo: str, name: str, tokenizer_path: str | None = None,
                   source: str | None = None, license: str | None = None, force: bool = False,
                   capturable: bool = False) -> str:
    """`capturable`: also write each layer's graph without control flow (`CAPTURABLE_LAYER`), which
    the server needs for CUDA graphs (`runtime.cuda_graphs`, `runtime.layer_graph = "capturable"`)."""
    check_name("backbone", name)
    if ck.hidden_size % ck.num_heads:
        raise InvalidCheckpoint(f"hidden_size {ck.hidden_size} is not a multiple of num_heads {ck.num_heads}")
    final = os.path.join(repo, "backbones", name)
    if os.path.exists(final) and not force:
        raise ExportError(f"{final} already exists (use --force to replace it)")
    if tokenizer_path is None and os.path.isfile(os.path.join(ck.path, "tokenizer.json")):
        tokenizer_path = os.path.join(ck.path, "tokenizer.json")
    if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
        raise ExportError(f"tokenizer {tokenizer_path} not found")
    tmp = _fresh_tmp(os.path.join(repo, "backbones"), name)
    try:
        save(embeddings_graph(ck), os.path.join(tmp, "embeddings.onnx"))
        if projects_embeddings(ck):
            save(embeddings_project_graph(ck), os.path.join(tmp, "embeddings_project.onnx"))
        for i in range(ck.num_layers):
            d = os.path.join(tmp, "layers", str(i))
            os.makedirs(d)
            save(attention_graph(ck, i), os.path.join(d, "attention.onnx"))
            save(plain_slot_graph(*ck.ln(i, "attention"), ck.eps, f"layer{i}_attention_slot"),
                 os.path.join(d, "attention_slot.onnx"))
            save(ffn_graph(ck, i), os.path.join(d, "ffn.onnx"))
            save(plain_slot_graph(*ck.ln(i, "ffn"), ck.eps, f"layer{i}_ffn_slot"), os.path.join(d, "ffn_slot.onnx"))
            save(layer_graph(ck, i), os.path.join(d, "layer.onnx"))  # the whole layer with adapter banks
            if capturable:
                save(layer_graph(ck, i, capturable=True), os.path.join(d, CAPTURABLE_LAYER))
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.json"))
        write_json(os.path.join(tmp, "backbone.json"),
                   backbone_manifest(ck, name, bool(tokenizer_path), source or "/".join(
                       os.path.normpath(os.path.abspath(ck.path)).split(os.sep)[-2:]), license, capturable))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_install(tmp, final, force)
    return final


def read_backbone(repo: str, name: str) -> dict:
    path = os.path.join(repo, "backbones", name, "backbone.json")
    if not os.path.isfile(path):
        raise ExportError(f"backbone {name!r} not found in {repo} ({path} missing)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class RepoLayerNorms:
    """LayerNorm weights of a backbone read back from its plain slot graphs (no checkpoint needed)."""

    def __init__(self, repo: str, name: str):
        self.dir = os.path.join(repo, "backbones", name)

    def ln(self, i: int, location: str):
        init = initializers(os.path.join(self.dir, "layers", str(i), f"{location}_slot.onnx"))
        return init["ln.weight"], init["ln.bias"]


# ---- tasks ----------------------------------------------------------------------------------
def parse_drop(num_layers: int, drop_first=None, layers=None, robust=None) -> dict:
    given = [x is not None for x in (drop_first, layers, robust)]
    if sum(given) != 1:
        raise ExportError("give exactly one of --drop-first, --drop-layers, --robust")
    if drop_first is not None:
        if not 0 <= int(drop_first) <= num_layers:
            raise ExportError(f"drop_first {drop_first} not in 0..{num_layers}")
        return {"drop_first": int(drop_first)}
    if layers is not None:
        layers = sorted(set(int(x) for x in layers))
        if any(not 0 <= x < num_layers for x in layers):
            raise ExportError(f"drop layers {layers} must be in 0..{num_layers - 1}")
        return {"layers": layers}
    default, lo, hi = (int(x) for x in robust)
    if not (0 <= lo <= default <= hi <= num_layers):
        raise ExportError(f"robust drop needs 0 <= min <= default <= max <= {num_layers}, got {default},{lo},{hi}")
    return {"robust": {"default": default, "min": lo, "max": hi}}


def always_dropped(drop: dict, num_layers: int) -> set:
    if "drop_first" in drop:
        return set(range(drop["drop_first"]))
    if "layers" in drop:
        return set(drop["layers"])
    return set(range(drop["robust"]["min"]))


def dropped_for(drop: dict, n: int | None = None) -> set:
    """Layers whose adapters are skipped for one request (n only for robust tasks)."""
    if "drop_first" in drop:
        return set(range(drop["drop_first"]))
    if "layers" in drop:
        return set(drop["layers"])
    r = drop["robust"]
    return set(range(r["default"] if n is None else n))


def write_task(repo: str, backbone: str, adapter: Adapter, head: Head, lns, name: str, version: int,
               drop: dict, description: str | None = None, force: bool = False, with_up: bool = False,
               threshold: float | None = None) -> str:
    """`lns` has .ln(layer, location) -> (weight, bias): a Checkpoint or RepoLayerNorms.
    with_up: also write each slot's adapter output graph (`"up"`, models/README.md "Fusion tasks"), byte
    for byte what a fusion task holds for the same adapter, so the server computes it once for both."""
    if with_up and not (adapter.residual_before_ln is True and adapter.original_ln_after):
        raise ExportError("an `up` graph needs residual_before_ln=true and original_ln_after=true "
                          "(the slot must be LN(up + h + x))")
    check_name("task", name)
    if int(version) < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    if threshold is not None and (head.kind != "multilabel" or not 0.0 <= float(threshold) <= 1.0):
        raise ExportError(f"threshold {threshold}: only a multilabel head has one, within 0..1 (this head is {head.kind})")
    bb = read_backbone(repo, backbone)
    L, H, eps = int(bb["num_layers"]), int(bb["hidden_size"]), float(bb["layer_norm_eps"])
    if adapter.hidden_size != H:
        raise InvalidCheckpoint(f"adapter hidden size {adapter.hidden_size} != backbone {backbone!r} hidden {H}")

    def build(tmp: str) -> dict:
        os.makedirs(os.path.join(tmp, "slots"))
        slots = []
        for layer, loc, sw in kept_slots(adapter.slots, drop, L, "adapter"):
            lw, lb = lns.ln(layer, loc)
            rel = f"slots/layer{layer}_{loc}.onnx"
            save(adapter_slot_graph(adapter, sw, lw, lb, eps, f"{name}_layer{layer}_{loc}"), os.path.join(tmp, rel))
            spec = {"layer": layer, "location": loc, "graph": rel}
            if with_up:
                from .fusion import adapter_up_graph  # fusion imports nothing from here
                up = f"adapters/{adapter.name}/layer{layer}_{loc}.onnx"
                os.makedirs(os.path.join(tmp, os.path.dirname(up)), exist_ok=True)
                save(adapter_up_graph(adapter, layer, loc, lw, lb, eps, f"{adapter.name}_layer{layer}_{loc}"),
                     os.path.join(tmp, up))
                spec["up"] = up
            slots.append(spec)
        save(head_graph(head, H), os.path.join(tmp, "head.onnx"))
        copy_adapterhub(adapter, head, os.path.join(tmp, ADAPTERHUB_DIR))
        return {
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": int(version),
            "backbone": backbone,
            "description": description or f"{adapter.name}: {adapter.method} adapter",
            "adapter": {"method": adapter.method, "reduction_factor": adapter.reduction_factor,
                        "non_linearity": adapter.non_linearity_name, "source": adapter.source},
            "slots": slots,
            "drop": drop,
            "head": {"type": head.kind, "graph": "head.onnx", "labels": list(head.labels),
                     **({"threshold": float(threshold)} if threshold is not None else {})},
            "adapterhub": ADAPTERHUB_DIR,
        }

    return install_task_version(repo, name, version, force, build)


def run_build(build) -> int:
    """The command-line end of a repository builder: runs `build()` (returns the directory it
    wrote), prints it with the time taken, or the export error on stderr with exit code 2."""
    t0 = time.time()
    try:
        out = build()
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out} ({time.time() - t0:.1f}s)")
    return 0
