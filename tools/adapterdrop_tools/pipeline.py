"""Run a repository's graphs with onnxruntime exactly as the server composes them
(embeddings -> per layer: attention -> slot -> ffn -> slot -> head). For tests and checks."""
from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort


def _session(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class BackboneRunner:
    def __init__(self, repo: str, name: str):
        self.dir = os.path.join(repo, "backbones", name)
        with open(os.path.join(self.dir, "backbone.json"), encoding="utf-8") as f:
            self.manifest = json.load(f)
        self.L = int(self.manifest["num_layers"])
        self.emb = _session(os.path.join(self.dir, "embeddings.onnx"))
        self.layers = []
        for i in range(self.L):
            d = os.path.join(self.dir, "layers", str(i))
            self.layers.append({k: _session(os.path.join(d, f"{k}.onnx"))
                                for k in ("attention", "attention_slot", "ffn", "ffn_slot")})

    def embeddings(self, ids, token_type_ids):
        return self.emb.run(["hidden"], {"input_ids": np.asarray(ids, np.int64),
                                         "token_type_ids": np.asarray(token_type_ids, np.int64)})[0]

    def layer(self, i: int, x0, mask, slots: dict | None = None):
        """One layer; `slots` maps location -> task slot session (absent: plain slot)."""
        seg = self.layers[i]
        slots = slots or {}
        h1 = seg["attention"].run(["h"], {"hidden": x0, "attention_mask": np.asarray(mask, np.int64)})[0]
        x1 = slots.get("attention", seg["attention_slot"]).run(["y"], {"h": h1, "x": x0})[0]
        h2 = seg["ffn"].run(["h"], {"hidden": x1})[0]
        return slots.get("ffn", seg["ffn_slot"]).run(["y"], {"h": h2, "x": x1})[0]

    def encode(self, ids, mask, token_type_ids=None, task: "TaskRunner | None" = None, dropped=()):
        ids = np.asarray(ids, np.int64)
        tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, np.int64)
        x = self.embeddings(ids, tt)
        for i in range(self.L):
            slots = task.slots_for(i) if (task is not None and i not in set(dropped)) else None
            x = self.layer(i, x, mask, slots)
        return x


class TaskRunner:
    def __init__(self, repo: str, name: str, version: int = 1):
        self.dir = os.path.join(repo, "tasks", name, str(version))
        with open(os.path.join(self.dir, "task.json"), encoding="utf-8") as f:
            self.manifest = json.load(f)
        self.slots = {}
        for s in self.manifest["slots"]:
            if s.get("kind", "adapter") == "fusion":
                sess = FusionSlotRunner(self.dir, s)
            else:
                sess = _session(os.path.join(self.dir, s["graph"]))
            self.slots.setdefault(int(s["layer"]), {})[s["location"]] = sess
        self.head = _session(os.path.join(self.dir, self.manifest["head"]["graph"]))

    def slots_for(self, layer: int) -> dict:
        return self.slots.get(layer, {})

    def logits(self, hidden):
        return self.head.run(["logits"], {"hidden": hidden})[0]


class FusionSlotRunner:
    """A fusion slot as the server runs it: each adapter's (h, x) -> up graph, stacked on axis 2, then
    the fusion graph (h, x, up) -> (y, alpha). Same `run` signature as a session; `last_alpha` kept."""

    def __init__(self, task_dir: str, spec: dict):
        self.fusion = _session(os.path.join(task_dir, spec["graph"]))
        self.adapters = [_session(os.path.join(task_dir, a["graph"])) for a in spec["adapters"]]
        self.last_alpha = None

    def run(self, outputs, feeds):
        ups = np.stack([a.run(["up"], feeds)[0] for a in self.adapters], axis=2)
        y, self.last_alpha = self.fusion.run(["y", "alpha"], {**feeds, "up": ups})
        return [y]


class Pipeline:
    """Backbone + task, run for a given set of dropped layers."""

    def __init__(self, repo: str, task: str, version: int = 1, backbones: dict | None = None):
        self.task = TaskRunner(repo, task, version)
        bname = self.task.manifest["backbone"]
        cache = backbones if backbones is not None else {}
        if bname not in cache:
            cache[bname] = BackboneRunner(repo, bname)
        self.backbone = cache[bname]

    def logits(self, ids, mask, token_type_ids=None, dropped=()):
        hidden = self.backbone.encode(ids, mask, token_type_ids, self.task, dropped)
        return self.task.logits(hidden)
