"""Seeded random checkpoints and adapters in the exact Hugging Face / AdapterHub file layouts."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
from safetensors.numpy import save_file



def shared_dir() -> str:
    """The project's shared/ folder: $ADAPTERDROP_SHARED, else shared/ beside the repository, else /work/shared."""
    env = os.environ.get("ADAPTERDROP_SHARED")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "..", "..", "shared"), os.path.join(here, "..", "..", "..", "shared")):
        if os.path.isdir(os.path.join(cand, "fixtures")):
            return os.path.normpath(cand)
    return "/work/shared"


def adapterhub_tiny() -> str:
    return os.path.join(shared_dir(), "fixtures", "adapterhub-tiny")


TOKENIZER_SRC = os.path.join(adapterhub_tiny(), "bert-tiny", "backbone", "tokenizer.json")

# adapter_config.json "config" as saved by adapters 1.3.0 for a Pfeiffer (seq_bn) adapter.
BN_CONFIG = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0,
    "factorized_phm_W": True, "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform",
    "init_weights": "bert", "init_weights_seed": None, "inv_adapter": None,
    "inv_adapter_reduction_factor": None, "is_parallel": False, "learn_phm": True, "leave_out": [],
    "ln_after": False, "ln_before": False, "mh_adapter": False, "non_linearity": "relu",
    "original_ln_after": True, "original_ln_before": True, "output_adapter": True, "phm_bias": True,
    "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False, "phm_rank": 1,
    "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}
PRESETS = {
    "pfeiffer": {"mh_adapter": False, "original_ln_before": True},
    "houlsby": {"mh_adapter": True, "original_ln_before": False},
}


def _json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def random_bert(out: str, seed: int, layers=3, hidden=32, heads=4, ffn=64, vocab=30522, max_pos=64,
                prefix="bert.", tokenizer=TOKENIZER_SRC) -> str:
    """A BERT checkpoint (config.json + model.safetensors [+ tokenizer.json]) with large random weights."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)

    def mat(*shape, std=0.25):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {"embeddings.word_embeddings.weight": mat(vocab, hidden, std=0.5),
         "embeddings.position_embeddings.weight": mat(max_pos, hidden, std=0.5),
         "embeddings.token_type_embeddings.weight": mat(2, hidden, std=0.5),
         "embeddings.LayerNorm.weight": 1.0 + mat(hidden, std=0.2),
         "embeddings.LayerNorm.bias": mat(hidden, std=0.1)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            w[p + f"attention.self.{name}.weight"] = mat(hidden, hidden)
            w[p + f"attention.self.{name}.bias"] = mat(hidden, std=0.1)
        w[p + "attention.output.dense.weight"] = mat(hidden, hidden)
        w[p + "attention.output.dense.bias"] = mat(hidden, std=0.1)
        w[p + "attention.output.LayerNorm.weight"] = 1.0 + mat(hidden, std=0.2)
        w[p + "attention.output.LayerNorm.bias"] = mat(hidden, std=0.1)
        w[p + "intermediate.dense.weight"] = mat(ffn, hidden)
        w[p + "intermediate.dense.bias"] = mat(ffn, std=0.1)
        w[p + "output.dense.weight"] = mat(hidden, ffn)
        w[p + "output.dense.bias"] = mat(hidden, std=0.1)
        w[p + "output.LayerNorm.weight"] = 1.0 + mat(hidden, std=0.2)
        w[p + "output.LayerNorm.bias"] = mat(hidden, std=0.1)
    w["pooler.dense.weight"] = mat(hidden, hidden)
    w["pooler.dense.bias"] = mat(hidden, std=0.1)
    save_file({prefix + k: v for k, v in w.items()}, os.path.join(out, "model.safetensors"))
    _json(os.path.join(out, "config.json"), {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": ffn, "layer_norm_eps": 1e-12, "max_position_embeddings": max_pos,
        "model_type": "bert", "num_attention_heads": heads, "num_hidden_layers": layers, "pad_token_id": 0,
        "position_embedding_type": "absolute", "type_vocab_size": 2, "vocab_size": vocab,
        "_comment": f"seeded random weights (seed {seed}), adapterdrop-serve tools/make_fixtures.py"})
    if tokenizer and os.path.isfile(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(out, "tokenizer.json"))
    return out


def random_adapter(out: str, seed: int, name: str, preset: str, num_layers: int, hidden: int,
                   reduction_factor, non_linearity: str, labels: list, std_down=0.3, std_up=0.3,
                   std_head=0.3, prefix="bert.", model_type="bert") -> str:
    """An AdapterHub-saved adapter + classification head (adapters 1.3.0 layout and key names)."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    cfg = {**BN_CONFIG, **PRESETS[preset], "non_linearity": non_linearity, "reduction_factor": reduction_factor}
    d_b = max(1, int(hidden // reduction_factor))
    locations = ["attention.output.", "output."] if cfg["mh_adapter"] else ["output."]
    tensors = {}
    for i in range(num_layers):
        for loc in locations:
            base = f"{prefix}encoder.layer.{i}.{loc}adapters.{name}."
            tensors[base + "adapter_down.0.weight"] = (rng.standard_normal((d_b, hidden)) * std_down).astype(np.float32)
            tensors[base + "adapter_down.0.bias"] = (rng.standard_normal(d_b) * 0.1).astype(np.float32)
            tensors[base + "adapter_up.weight"] = (rng.standard_normal((hidden, d_b)) * std_up).astype(np.float32)
            tensors[base + "adapter_up.bias"] = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    save_file(tensors, os.path.join(out, "adapter.safetensors"))
    model_class = "RobertaAdapterModel" if model_type == "roberta" else "BertAdapterModel"
    meta = {"hidden_size": hidden, "model_class": model_class, "model_name": "", "model_type": model_type,
            "name": name, "version": "adapters.1.3.0"}
    _json(os.path.join(out, "adapter_config.json"), {"config": cfg, **meta})
    n = len(labels)
    head = {f"heads.{name}.1.weight": rng.standard_normal((hidden, hidden)) * std_head,
            f"heads.{name}.1.bias": rng.standard_normal(hidden) * 0.1,
            f"heads.{name}.4.weight": rng.standard_normal((n, hidden)) * 0.3,
            f"heads.{name}.4.bias": rng.standard_normal(n) * 0.1}
    save_file({k: v.astype(np.float32) for k, v in head.items()}, os.path.join(out, "model_head.safetensors"))
    head_cfg = {"activation_function": "tanh", "bias": True, "dropout_prob": None, "head_type": "classification",
                "label2id": {lab: i for i, lab in enumerate(labels)}, "layers": 2, "num_labels": n,
                "use_pooler": False}
    _json(os.path.join(out, "head_config.json"), {"config": head_cfg, **meta})
    return out


def make_all(out: str, seed: int) -> dict:
    """Everything make_fixtures.py writes; returns name -> directory."""
    paths = {}
    tr = os.path.join(out, "tiny-random")
    paths["tiny-random"] = random_bert(os.path.join(tr, "backbone"), seed)
    paths["rand-pfeiffer"] = random_adapter(os.path.join(tr, "adapters", "rand-pfeiffer"), seed + 1, "pf_rand",
                                            "pfeiffer", 3, 32, 8, "relu", ["negative", "positive"])
    paths["rand-houlsby"] = random_adapter(os.path.join(tr, "adapters", "rand-houlsby"), seed + 2, "hb_rand",
                                           "houlsby", 3, 32, 4, "swish", ["business", "sport", "tech"])
    mini = os.path.join(out, "minilm", "adapters")
    # MiniLM-shaped (hidden 384, 6 layers); smaller std so activations stay in a sane range.
    paths["mini-pfeiffer"] = random_adapter(os.path.join(mini, "mini-pfeiffer"), seed + 3, "mini_pf", "pfeiffer",
                                            6, 384, 16, "relu", ["negative", "positive"],
                                            std_down=0.08, std_up=0.15, std_head=0.08, prefix="")
    paths["mini-houlsby"] = random_adapter(os.path.join(mini, "mini-houlsby"), seed + 4, "mini_hb", "houlsby",
                                           6, 384, 32, "swish", ["business", "sport", "tech"],
                                           std_down=0.08, std_up=0.2, std_head=0.08, prefix="bert.")
    # Houlsby adapters under a "static" AdapterFusion: fusion at both slot locations, no value matrix.
    paths["hb-two"] = random_adapter(os.path.join(tr, "adapters", "hb-two"), seed + 5, "hb_two", "houlsby",
                                     3, 32, 8, "relu", ["no", "yes"])
    paths["rand-fusion"] = random_fusion(os.path.join(tr, "fusion-static"), seed + 6, ["hb_rand", "hb_two"],
                                         "static", 3, 32, ["attention.output.", "output."], ["no", "yes"])
    return paths


FUSION_CONFIGS = {
    "static": {"dropout_prob": None, "key": True, "query": True, "query_before_ln": False, "regularization": False,
               "residual_before": False, "temperature": False, "value": False, "value_before_softmax": True,
               "value_initialized": False},
    "dynamic": {"dropout_prob": None, "key": True, "query": True, "query_before_ln": False, "regularization": True,
                "residual_before": False, "temperature": False, "value": True, "value_before_softmax": True,
                "value_initialized": True},
}


def random_fusion(out: str, seed: int, names: list, config: str, num_layers: int, hidden: int, locations: list,
                  labels: list, prefix="bert.", std=0.3, value_near_identity=False) -> str:
    """An AdapterFusion saved in the library's layout (adapter_fusion_config.json,
    model_adapter_fusion.safetensors) with random query/key(/value) weights, plus a head "fused".
    value_near_identity: value = I + small noise, like the library's value_initialized start."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    cfg, fname = FUSION_CONFIGS[config], ",".join(names)
    tensors = {}
    for i in range(num_layers):
        for loc in locations:
            base = f"{prefix}encoder.layer.{i}.{loc}adapter_fusion_layer.{fname}."
            parts = ["query", "key"] + (["value"] if cfg["value"] else [])
            for part in parts:
                w = rng.standard_normal((hidden, hidden)) * std
                if part == "value" and value_near_identity:
                    w = np.eye(hidden) + w * 0.1
                tensors[base + part + ".weight"] = w.astype(np.float32)
                if part != "value":
                    tensors[base + part + ".bias"] = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    save_file(tensors, os.path.join(out, "model_adapter_fusion.safetensors"))
    meta = {"hidden_size": hidden, "model_class": "BertAdapterModel", "model_name": "", "model_type": "bert",
            "version": "adapters.1.3.0"}
    _json(os.path.join(out, "adapter_fusion_config.json"), {"adapter_names": names, "config": cfg, "name": fname, **meta})
    n = len(labels)
    head = {"heads.fused.1.weight": rng.standard_normal((hidden, hidden)) * std,
            "heads.fused.1.bias": rng.standard_normal(hidden) * 0.1,
            "heads.fused.4.weight": rng.standard_normal((n, hidden)) * 0.3,
            "heads.fused.4.bias": rng.standard_normal(n) * 0.1}
    save_file({k: v.astype(np.float32) for k, v in head.items()}, os.path.join(out, "model_head.safetensors"))
    head_cfg = {"activation_function": "tanh", "bias": True, "dropout_prob": None, "head_type": "classification",
                "label2id": {lab: i for i, lab in enumerate(labels)}, "layers": 2, "num_labels": n, "use_pooler": False}
    _json(os.path.join(out, "head_config.json"), {"config": head_cfg, "name": "fused", **meta})
    return out
