#!/usr/bin/env python3
"""Reference fixtures for issue 14: small random models saved by the AdapterHub `adapters` library, with
the library's own outputs at every drop depth. Run in the training venv (`make breadth-fixtures`).

Usage: make_breadth_fixtures.py --out tests/fixtures/adapterhub-breadth [--seed S]

For each backbone (bert, roberta, xlm-roberta, distilbert, electra; 3 layers, hidden 32) it writes
  <out>/<backbone>/backbone/          save_pretrained of the plain model + its tokenizer (built offline)
  <out>/<backbone>/adapters/<task>/   save_adapter(..., with_head=True) (the Stack's language adapter
                                      without head, its task adapter with)
  <out>/<backbone>/reference.json     inputs (texts, pairs, choices, tokenized) and, per task and drop
                                      depth n (skip_layers = [0..n-1]), the library's outputs; the plain
                                      backbone's CLS and mean-pooled embedding.
Every number comes from the library's own forward pass (torch, float32, eval mode); nothing here is
computed by the project's code. See the README written next to the fixtures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import adapters
from adapters import AutoAdapterModel, Stack
from adapters import ConfigUnion  # noqa: F401  (imported so a version without it fails loudly here)
from adapters import LoRAConfig, IA3Config, ParBnConfig, SeqBnConfig, DoubleSeqBnConfig, SeqBnInvConfig
import transformers
from transformers import (AutoModel, BertConfig, BertTokenizerFast, DistilBertConfig, DistilBertTokenizerFast,
                          ElectraConfig, ElectraTokenizerFast, RobertaConfig, RobertaTokenizerFast,
                          XLMRobertaConfig, XLMRobertaTokenizerFast)

LAYERS, HIDDEN, HEADS, FFN, MAX_POS = 3, 32, 4, 64, 64

TEXTS = ["the film was a gripping, beautifully shot thriller.",
         "the plot never comes together and the acting is flat.",
         "Maria Garcia flew from Madrid to New York on Monday.",
         "stocks fell sharply"]
PAIRS = [["who flew to New York?", "Maria Garcia flew from Madrid to New York on Monday."],
         ["what fell sharply?", "after the report stocks fell sharply in London."]]
CHOICES = [["the film was", ["a gripping thriller.", "a flat story.", "shot in Madrid."]],
           ["stocks fell", ["sharply on Monday.", "from New York.", "the plot never ends."]]]
CORPUS = TEXTS + [p for pair in PAIRS for p in pair] + [c for ctx, ch in CHOICES for c in [ctx] + ch] + [
    "el perro come pan en la casa.", "der Hund isst Brot im Haus.", "a quick brown fox jumps over the lazy dog.",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ? ! ' -"]

TAG_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


# ---- tokenizers, built offline from the corpus above -----------------------------------------------
def wordpiece_vocab() -> list:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({c for t in CORPUS for c in t.lower() if not c.isspace()})
    words = sorted({w for t in CORPUS for w in transformers.BasicTokenizer(do_lower_case=True).tokenize(t)}
                   - set(chars))
    return special + chars + ["##" + c for c in chars if c.isalnum()] + words


def make_tokenizer(kind: str, tmp: str):
    if kind in ("bert", "distilbert", "electra"):
        vocab = os.path.join(tmp, "vocab.txt")
        with open(vocab, "w", encoding="utf-8") as f:
            f.write("\n".join(wordpiece_vocab()) + "\n")
        cls = {"bert": BertTokenizerFast, "distilbert": DistilBertTokenizerFast, "electra": ElectraTokenizerFast}[kind]
        return cls(vocab_file=vocab, do_lower_case=True, model_max_length=MAX_POS)
    from tokenizers import ByteLevelBPETokenizer, processors
    if kind == "roberta":
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
        bpe.save_model(tmp)
        return RobertaTokenizerFast(vocab_file=os.path.join(tmp, "vocab.json"),
                                    merges_file=os.path.join(tmp, "merges.txt"), model_max_length=MAX_POS - 2)
    # xlm-roberta: a SentencePiece-style unigram model with XLM-R's special tokens at ids 0..3, written
    # out piece by piece (the unigram trainer is not reproducible run to run). Whole words of TEXTS are
    # pieces; everything else splits into single characters.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    words = sorted({w for t in TEXTS for w in t.split()})
    chars = sorted({c for t in CORPUS for c in t if not c.isspace()})
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0)]
    vocab += [("\u2581" + w, -2.0 - 0.01 * i) for i, w in enumerate(words)]
    vocab += [("\u2581", -6.0)] + [(c, -8.0 - 0.01 * i) for i, c in enumerate(chars)]
    sp = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    sp.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return XLMRobertaTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>",
                                   sep_token="</s>", cls_token="<s>", unk_token="<unk>", pad_token="<pad>",
                                   mask_token="<mask>", model_max_length=MAX_POS - 2)


def make_config(kind: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, max_position_embeddings=MAX_POS)
    if kind == "bert":
        return BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          intermediate_size=FFN, pad_token_id=0, **common)
    if kind in ("roberta", "xlm-roberta"):
        cls = RobertaConfig if kind == "roberta" else XLMRobertaConfig
        return cls(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                   pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                   vocab_size=vocab_size, max_position_embeddings=MAX_POS + 2)
    if kind == "distilbert":
        return DistilBertConfig(dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, pad_token_id=0, **common)
    if kind == "electra":  # embedding_size != hidden_size: exercises embeddings_project
        return ElectraConfig(embedding_size=16, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                             num_attention_heads=HEADS, intermediate_size=FFN, pad_token_id=0, **common)
    raise ValueError(kind)


# ---- random weights, large enough that every term matters --------------------------------------------
def randomize(named_params, gen: torch.Generator, skip=frozenset()):
    with torch.no_grad():
        for name, p in named_params:
            if name in skip:
                continue
            noise = torch.randn(p.shape, generator=gen)
            leaf = name.split(".")[-1]
            if "LayerNorm" in name or "layer_norm" in name or name.endswith(("norm.weight", "norm.bias")):
                p.copy_(1.0 + 0.2 * noise if leaf == "weight" else 0.1 * noise)
            elif "lora_B" in name and p.dim() == 2 and p.shape[-1] == 1:  # (IA)^3 scaling vector
                p.copy_(1.0 + 0.3 * noise)
            elif leaf == "bias":
                p.copy_(0.1 * noise)
            elif "embeddings" in name and p.dim() == 2 and p.shape[0] > HIDDEN:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.25 * noise)


# ---- the tasks: (name, adapter config, head, inputs) --------------------------------------------------
def task_specs():
    lora = LoRAConfig(r=4, alpha=8, attn_matrices=["q", "k", "v"], selfattn_lora=True, intermediate_lora=True,
                      output_lora=True)
    return [
        # name, adapter config, head kind, head kwargs, input set
        ("pfeiffer", SeqBnConfig(reduction_factor=8), "classification", {"num_labels": 2}, "texts"),
        ("houlsby", DoubleSeqBnConfig(reduction_factor=4), "classification", {"num_labels": 3}, "texts"),
        ("pfeiffer_pairs", SeqBnConfig(reduction_factor=4, non_linearity="gelu"), "classification",
         {"num_labels": 2}, "pairs"),
        ("par_bn", ParBnConfig(reduction_factor=4), "classification", {"num_labels": 2}, "texts"),
        ("lora", lora, "classification", {"num_labels": 2}, "texts"),
        ("ia3", IA3Config(), "classification", {"num_labels": 2}, "texts"),
        ("multilabel", SeqBnConfig(reduction_factor=8), "multilabel", {"num_labels": 4}, "texts"),
        ("tagging", SeqBnConfig(reduction_factor=8), "tagging", {"num_labels": len(TAG_LABELS)}, "texts"),
        ("qa", SeqBnConfig(reduction_factor=8), "qa", {}, "pairs"),
        ("choice", SeqBnConfig(reduction_factor=8), "multiple_choice", {"num_choices": 3}, "choices"),
        ("stack", SeqBnConfig(reduction_factor=8), "classification", {"num_labels": 2}, "texts"),
    ]


def add_head(model, name, kind, kw):
    if kind == "classification":
        model.add_classification_head(name, num_labels=kw["num_labels"],
                                      id2label={i: f"label{i}" for i in range(kw["num_labels"])})
    elif kind == "multilabel":
        model.add_classification_head(name, num_labels=kw["num_labels"], multilabel=True,
                                      id2label={i: f"topic{i}" for i in range(kw["num_labels"])})
    elif kind == "tagging":
        model.add_tagging_head(name, num_labels=kw["num_labels"], id2label=dict(enumerate(TAG_LABELS)))
    elif kind == "qa":
        model.add_qa_head(name)
    elif kind == "multiple_choice":
        model.add_multiple_choice_head(name, num_choices=kw["num_choices"])
    else:
        raise ValueError(kind)


def encode_inputs(tok) -> dict:
    t = tok(TEXTS, padding=True, return_offsets_mapping=True, return_tensors="np")
    p = tok([q for q, _ in PAIRS], [c for _, c in PAIRS], padding=True, return_tensors="np")
    firsts = [ctx for ctx, ch in CHOICES for _ in ch]
    seconds = [c for _, ch in CHOICES for c in ch]
    c = tok(firsts, seconds, padding=True, return_tensors="np")
    k = len(CHOICES[0][1])

    def arrays(enc, shape=None):
        out = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in enc:
                a = enc[key].astype(np.int64)
                out[key] = a.reshape(shape + [a.shape[-1]]) if shape else a
        return out

    texts = arrays(t)
    texts["offsets"] = t["offset_mapping"].tolist()
    texts["word_ids"] = [t.word_ids(i) for i in range(len(TEXTS))]
    return {"texts": texts, "pairs": arrays(p), "choices": arrays(c, [len(CHOICES), k])}


def torch_inputs(arrs: dict, with_types: bool) -> dict:
    keys = ("input_ids", "attention_mask") + (("token_type_ids",) if with_types else ())
    return {k: torch.tensor(np.asarray(arrs[k])) for k in keys if k in arrs}


def outputs_of(out, kind: str) -> dict:
    if kind == "qa":
        return {"start_logits": out.start_logits.tolist(), "end_logits": out.end_logits.tolist()}
    return {"logits": out.logits.tolist()}


def build_backbone(kind: str, root: str, seed: int) -> dict:
    bdir = os.path.normpath(os.path.join(root, kind))
    shutil.rmtree(bdir, ignore_errors=True)
    backbone_dir = os.path.join(bdir, "backbone")
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(kind, tmp)
    config = make_config(kind, len(tok))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    plain = AutoModel.from_config(config).eval()
    randomize(plain.named_parameters(), gen)
    plain.save_pretrained(backbone_dir, safe_serialization=True)
    tok.save_pretrained(backbone_dir)
    for extra in ("vocab.txt", "vocab.json", "merges.txt"):  # tokenizer.json says it all
        if os.path.isfile(os.path.join(backbone_dir, extra)) and kind not in ("bert", "distilbert", "electra"):
            os.remove(os.path.join(backbone_dir, extra))

    inputs = encode_inputs(tok)
    with_types = kind in ("bert", "electra")  # models whose forward takes token_type_ids
    ref = {"architecture": kind, "model_type": config.model_type, "num_layers": LAYERS, "hidden_size": HIDDEN,
           "library": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                       "torch": torch.__version__},
           "texts": TEXTS, "pairs": PAIRS, "choices": CHOICES, "tag_labels": TAG_LABELS,
           "inputs": {k: {kk: (vv.tolist() if isinstance(vv, np.ndarray) else vv) for kk, vv in v.items()}
                      for k, v in inputs.items()},
           "embedding": {}, "tasks": {}}

    # The plain backbone's sentence embedding (no adapter): CLS and masked mean, unnormalised.
    with torch.no_grad():
        ti = torch_inputs(inputs["texts"], with_types)
        hid = plain(**ti).last_hidden_state
        m = ti["attention_mask"].unsqueeze(-1).float()
        ref["embedding"] = {"cls": hid[:, 0].tolist(),
                            "mean": ((hid * m).sum(1) / m.sum(1).clamp(min=1e-9)).tolist()}

    base_keys = set(AutoAdapterModel.from_pretrained(backbone_dir).state_dict())
    for t_i, (name, cfg, head, kw, which) in enumerate(task_specs()):
        model = AutoAdapterModel.from_pretrained(backbone_dir).eval()
        names = [name]
        if name == "stack":  # MAD-X: a language adapter with an invertible adapter under a task adapter
            model.add_adapter("lang", config=SeqBnInvConfig(reduction_factor=4))
            names = ["lang", name]
        model.add_adapter(name, config=cfg)
        add_head(model, name, head, kw)
        randomize(model.named_parameters(), torch.Generator().manual_seed(seed * 100 + t_i), skip=base_keys)
        setup = Stack("lang", name) if name == "stack" else name
        model.active_head = name
        adir = os.path.join(bdir, "adapters", name)
        os.makedirs(os.path.join(bdir, "adapters"), exist_ok=True)
        model.save_adapter(adir, name, with_head=True, use_safetensors=True)
        if name == "stack":
            model.save_adapter(os.path.join(bdir, "adapters", "lang"), "lang", with_head=False, use_safetensors=True)
        ti = torch_inputs(inputs[which], with_types)
        outs = {}
        for n in range(LAYERS + 1):
            model.set_active_adapters(setup, skip_layers=list(range(n)) if n else None)
            with torch.no_grad():
                outs[str(n)] = outputs_of(model(**ti), head)
        ref["tasks"][name] = {"adapters": names, "config": cfg.to_dict(), "head": head, "inputs": which,
                              "outputs": outs}
        print(f"{kind}/{name}: {head} on {which}, n = 0..{LAYERS}", file=sys.stderr)
    with open(os.path.join(bdir, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(ref, f, indent=None, separators=(",", ":"))
        f.write("\n")
    return ref


BACKBONES = ["bert", "roberta", "xlm-roberta", "distilbert", "electra"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--only", nargs="*", choices=BACKBONES, help="build only these backbones")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    os.chdir(a.out)  # the library records the backbone path as model_name: keep it "<backbone>/backbone"
    for i, kind in enumerate(BACKBONES):
        if a.only and kind not in a.only:
            continue
        build_backbone(kind, ".", a.seed + 1000 * i)
    return 0


if __name__ == "__main__":
    sys.exit(main())
