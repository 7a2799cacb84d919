"""Read AdapterHub bottleneck adapters (adapter_config.json + weights) and prediction heads."""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field

import numpy as np

from . import InvalidCheckpoint, MissingWeight, UnsupportedAdapter

ACTIVATIONS = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "gelu_orig": "gelu",
               "tanh": "tanh", "sigmoid": "sigmoid"}
LOCATIONS = ("attention", "ffn")
# BnConfig defaults for keys an (old) checkpoint may omit.
BN_DEFAULTS = {"original_ln_before": False, "original_ln_after": True, "residual_before_ln": True,
               "ln_before": False, "ln_after": False, "is_parallel": False, "scaling": 1.0,
               "use_gating": False, "leave_out": [], "phm_layer": False, "inv_adapter": None,
               "cross_adapter": False}
# BERT/RoBERTa/XLM-R/ELECTRA: encoder.layer.{i}.(attention.output|output).adapters...;
# DistilBERT: transformer.layer.{i}.(attention_adapters|output_adapters).adapters...
KEY_RE = re.compile(r"^(?:(bert|roberta|distilbert|electra)\.)?(?:encoder|transformer)\.layer\.(\d+)\."
                    r"(attention\.output|output|attention_adapters|output_adapters)\.adapters\."
                    r"([^.]+)\.(.+)$")
ATTENTION_KEYS = ("attention.output", "attention_adapters")
PARAM_NAMES = {"adapter_down.0.weight": "down_w", "adapter_down.0.bias": "down_b",
               "adapter_up.weight": "up_w", "adapter_up.bias": "up_b"}


@dataclass
class SlotWeights:
    down_w: np.ndarray  # [d_b, H]
    down_b: np.ndarray  # [d_b]
    up_w: np.ndarray  # [H, d_b]
    up_b: np.ndarray  # [H]


@dataclass
class Adapter:
    name: str
    method: str  # seq_bn | double_seq_bn | bottleneck
    hidden_size: int
    non_linearity: str  # normalized: relu | silu | gelu | tanh | sigmoid
    non_linearity_name: str  # as written in the config
    reduction_factor: object
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: object  # True | False | "post_add"
    scaling: float
    leave_out: list
    locations: tuple
    slots: dict = field(repr=False)  # (layer, location) -> SlotWeights
    source: str = ""
    is_parallel: bool = False  # par_bn: the bottleneck reads the sub-layer input (layer graphs only)
    directory: str = ""  # where adapter_config.json was read
    weights_file: str = ""  # the weights file read (safetensors or a torch .bin)


@dataclass
class Head:
    name: str
    kind: str  # classification | regression | multilabel | multiple_choice
    labels: list
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    directory: str = ""  # where head_config.json was read
    weights_file: str = ""


# Where the methods the slot graphs cannot express are served instead.
BANKS_ONLY = ("register the AdapterHub directory weights-only (tools/register_task.py register --weights-only "
              "--adapter DIR --backbone B ...); the server runs it on the adapter banks")

ADAPTERHUB_FILES = ("adapter_config.json", "adapter.safetensors", "head_config.json", "model_head.safetensors")


def copy_adapterhub(adapter: Adapter, head: Head, out: str) -> None:
    """Write the AdapterHub files an adapter and its head were read from into `out`, as `save_adapter`
    writes them: the two configs verbatim, the weights verbatim when they are safetensors, else
    converted to float32 safetensors (same keys), so the server's own parser can read them."""
    from safetensors.numpy import save_file
    os.makedirs(out, exist_ok=True)
    for src_dir, cfg, wfile, st_name in ((adapter.directory, "adapter_config.json", adapter.weights_file,
                                          "adapter.safetensors"),
                                         (head.directory, "head_config.json", head.weights_file,
                                          "model_head.safetensors")):
        if not src_dir or not wfile:
            raise InvalidCheckpoint("the adapter or head was not read from an AdapterHub directory")
        shutil.copyfile(os.path.join(src_dir, cfg), os.path.join(out, cfg))
        if wfile.endswith(".safetensors"):
            shutil.copyfile(wfile, os.path.join(out, st_name))
        else:
            tensors = _read_bin(wfile)
            save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, os.path.join(out, st_name))


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise InvalidCheckpoint(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_bin(pt: str, st_name: str = "safetensors") -> dict:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InvalidCheckpoint(f"{pt} is a PyTorch pickle and torch is not installed; "
                                f"convert it to {st_name}") from None
    state = torch.load(pt, map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() for k, v in state.items()}


def load_tensors(directory: str, st_name: str, bin_name: str) -> tuple[dict, str]:
    """safetensors if present, else the torch pickle (only when torch imports)."""
    st = os.path.join(directory, st_name)
    if os.path.isfile(st):
        from safetensors.numpy import load_file
        return {k: np.asarray(v, np.float32) for k, v in load_file(st).items()}, st
    pt = os.path.join(directory, bin_name)
    if os.path.isfile(pt):
        return _read_bin(pt, st_name), pt
    raise InvalidCheckpoint(f"neither {st_name} nor {bin_name} found in {directory}")


def _check_config(cfg) -> dict:
    if not isinstance(cfg, dict):
        raise UnsupportedAdapter(f"config is {cfg!r}: a preset name without its fields is not supported")
    arch = cfg.get("architecture")
    if "configs" in cfg or arch == "union":
        raise UnsupportedAdapter("architecture 'union' (ConfigUnion / MAM / UniPELT) is not supported")
    if arch == "lora":  # the library stores (IA)^3 as a LoRA config with composition_mode "scale"
        method = "(IA)^3 (ia3)" if cfg.get("composition_mode") == "scale" else "LoRA (lora)"
        raise UnsupportedAdapter(f"adapter method {method} (architecture='lora') is not exported to slot graphs: "
                                 f"{BANKS_ONLY}")
    if arch not in (None, "bottleneck"):
        raise UnsupportedAdapter(f"architecture {arch!r} is not supported (bottleneck adapters, LoRA and (IA)^3 "
                                 "only; union / prefix_tuning / prompt_tuning and the others are not)")
    if cfg.get("is_parallel"):
        raise UnsupportedAdapter(f"parallel bottleneck adapters (par_bn, is_parallel=true) are not exported to slot "
                                 f"graphs: {BANKS_ONLY}")
    for key in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity"):
        if key not in cfg:
            raise UnsupportedAdapter(f"config lacks required field {key!r}")
    cfg = {**BN_DEFAULTS, **cfg}
    for key in ("is_parallel", "use_gating", "phm_layer", "ln_before", "ln_after", "cross_adapter"):
        if cfg.get(key):
            raise UnsupportedAdapter(f"{key}={cfg[key]!r} is not supported")
    if cfg.get("inv_adapter"):
        raise UnsupportedAdapter(f"inv_adapter={cfg['inv_adapter']!r} (invertible adapters) is not supported")
    if isinstance(cfg["scaling"], bool) or not isinstance(cfg["scaling"], (int, float)):
        raise UnsupportedAdapter(f"scaling={cfg['scaling']!r} is not supported (a number only)")
    if cfg["residual_before_ln"] not in (True, False, "post_add"):
        raise UnsupportedAdapter(f"residual_before_ln={cfg['residual_before_ln']!r} is not supported")
    if cfg["residual_before_ln"] == "post_add" and not cfg["original_ln_before"]:
        raise UnsupportedAdapter("residual_before_ln='post_add' needs original_ln_before=true")
    nl = str(cfg["non_linearity"]).lower()
    if nl not in ACTIVATIONS:
        raise UnsupportedAdapter(f"non_linearity={cfg['non_linearity']!r} is not supported "
                                 f"(one of {sorted(ACTIVATIONS)})")
    if not (cfg["mh_adapter"] or cfg["output_adapter"]):
        raise UnsupportedAdapter("mh_adapter and output_adapter are both false: no adapter location")
    return cfg


def bottleneck_size(hidden: int, rf, layer: int) -> int:
    if isinstance(rf, dict):
        rf = rf.get(str(layer), rf.get("default"))
        if rf is None:
            raise UnsupportedAdapter(f"reduction_factor dict has no entry for layer {layer} and no 'default'")
    if isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf <= 0:
        raise UnsupportedAdapter(f"reduction_factor={rf!r} is not supported")
    return max(1, int(hidden // rf))


def _method(cfg: dict) -> str:
    if cfg["mh_adapter"] and cfg["output_adapter"]:
        return "double_seq_bn"
    if cfg["output_adapter"] and not cfg["mh_adapter"]:
        return "seq_bn"
    return "bottleneck"


def load_adapter(directory: str, num_layers: int, hidden_size: int | None = None) -> Adapter:
    if os.path.isfile(os.path.join(directory, "adapter_fusion_config.json")):
        raise UnsupportedAdapter(f"{directory} is an AdapterFusion directory; fusion is not supported")
    meta = _read_json(os.path.join(directory, "adapter_config.json"))
    if "config" not in meta or "name" not in meta:
        raise InvalidCheckpoint(f"{directory}/adapter_config.json lacks 'config' or 'name'")
    cfg = _check_config(meta["config"])
    name = meta["name"]
    hidden = int(meta.get("hidden_size") or hidden_size or 0)
    if hidden_size is not None and hidden and hidden != hidden_size:
        raise InvalidCheckpoint(f"adapter hidden_size {hidden} != backbone hidden size {hidden_size}")
    hidden = hidden or int(hidden_size)
    tensors, wpath = load_tensors(directory, "adapter.safetensors", "pytorch_adapter.bin")
    found, prefixes = {}, set()
    for key, value in tensors.items():
        m = KEY_RE.match(key)
        if not m:
            raise UnsupportedAdapter(f"unexpected weight {key!r} in {wpath} (not a bottleneck adapter)")
        prefix, layer, loc, aname, param = m.groups()
        if aname != name:
            raise InvalidCheckpoint(f"weight {key!r} belongs to adapter {aname!r}, config names {name!r}")
        if param not in PARAM_NAMES:
            raise UnsupportedAdapter(f"unexpected weight {key!r} in {wpath} (unsupported adapter parameter)")
        prefixes.add(prefix or "")
        location = "attention" if loc in ATTENTION_KEYS else "ffn"
        found[(int(layer), location, PARAM_NAMES[param])] = value
    prefix = sorted(prefixes)[0] + "." if prefixes and sorted(prefixes)[0] else ""
    leave_out = sorted(int(x) for x in (cfg.get("leave_out") or []))
    locations = tuple(loc for loc, on in (("attention", cfg["mh_adapter"]), ("ffn", cfg["output_adapter"])) if on)
    slots = {}
    for layer in range(num_layers):
        if layer in leave_out:
            continue
        for loc in locations:
            base = f"{prefix}encoder.layer.{layer}.{'attention.output' if loc == 'attention' else 'output'}.adapters.{name}."
            parts = {}
            for pname, field_name in PARAM_NAMES.items():
                if (layer, loc, field_name) not in found:
                    raise MissingWeight(f"key {base + pname!r} not found in {wpath}")
                parts[field_name] = found.pop((layer, loc, field_name))
            sw = SlotWeights(**parts)
            d_b = bottleneck_size(hidden, cfg["reduction_factor"], layer)
            want = {"down_w": (d_b, hidden), "down_b": (d_b,), "up_w": (hidden, d_b), "up_b": (hidden,)}
            for fname, shape in want.items():
                if getattr(sw, fname).shape != shape:
                    raise InvalidCheckpoint(f"{base}{fname}: shape {getattr(sw, fname).shape} != expected {shape}"
                                            f" (hidden {hidden}, reduction_factor {cfg['reduction_factor']!r})")
            slots[(layer, loc)] = sw
    if found:
        (layer, loc, _), = list(found)[:1]
        raise InvalidCheckpoint(f"{wpath} has weights for layer {layer} {loc}, which the config does not use "
                                f"(leave_out / mh_adapter / output_adapter / num_layers {num_layers})")
    version = meta.get("version", "")
    short = "/".join(os.path.normpath(os.path.abspath(directory)).split(os.sep)[-2:])
    return Adapter(name=name, method=_method(cfg), hidden_size=hidden,
                   non_linearity=ACTIVATIONS[str(cfg["non_linearity"]).lower()],
                   non_linearity_name=str(cfg["non_linearity"]), reduction_factor=cfg["reduction_factor"],
                   original_ln_before=bool(cfg["original_ln_before"]),
                   original_ln_after=bool(cfg["original_ln_after"]),
                   residual_before_ln=cfg["residual_before_ln"], scaling=float(cfg["scaling"]),
                   leave_out=leave_out, locations=locations, slots=slots,
                   source=f"{short} ({version})" if version else short,
                   directory=os.path.abspath(directory), weights_file=os.path.abspath(wpath))


def load_head(directory: str, hidden_size: int) -> Head:
    meta = _read_json(os.path.join(directory, "head_config.json"))
    cfg, name = meta.get("config") or {}, meta.get("name")
    # Multi-label and multiple-choice heads are the classification head's two layers; they differ in
    # what is made of the logits (a sigmoid per label; a softmax over an item's choices, one logit each).
    kinds = {"classification": "classification", "multilabel_classification": "multilabel",
             "multiple_choice": "multiple_choice"}
    if cfg.get("head_type") not in kinds:
        raise UnsupportedAdapter(f"head_type={cfg.get('head_type')!r} is not supported "
                                 f"(one of {', '.join(kinds)})")
    family = kinds[cfg["head_type"]]
    checks = {"layers": 2, "activation_function": "tanh", "use_pooler": False, "multilabel": False, "bias": True}
    for key, want in checks.items():
        if cfg.get(key, want) != want:
            raise UnsupportedAdapter(f"head {key}={cfg.get(key)!r} is not supported (only {want!r})")
    num_labels = 1 if family == "multiple_choice" else int(cfg.get("num_labels", 2))
    tensors, wpath = load_tensors(directory, "model_head.safetensors", "pytorch_model_head.bin")

    def get(k):
        key = f"heads.{name}.{k}"
        if key not in tensors:
            raise MissingWeight(f"key {key!r} not found in {wpath}")
        return tensors[key]

    w1, b1, w2, b2 = get("1.weight"), get("1.bias"), get("4.weight"), get("4.bias")
    if w1.shape != (hidden_size, hidden_size) or w2.shape != (num_labels, hidden_size):
        raise InvalidCheckpoint(f"head weights {w1.shape}/{w2.shape} do not fit hidden {hidden_size}, "
                                f"num_labels {num_labels}")
    label2id = cfg.get("label2id") or {f"LABEL_{i}": i for i in range(num_labels)}
    labels = [k for k, _ in sorted(label2id.items(), key=lambda kv: int(kv[1]))]
    where = {"directory": os.path.abspath(directory), "weights_file": os.path.abspath(wpath)}
    if family == "multiple_choice":
        return Head(name, "multiple_choice", [], w1, b1, w2, b2, **where)
    if num_labels == 1 and family == "classification":
        return Head(name, "regression", [], w1, b1, w2, b2, **where)
    if len(labels) != num_labels:
        raise InvalidCheckpoint(f"label2id has {len(labels)} labels, num_labels is {num_labels}")
    return Head(name, family, labels, w1, b1, w2, b2, **where)
