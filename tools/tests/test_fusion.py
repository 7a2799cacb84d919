"""AdapterFusion: numpy reference and exported graphs against the AdapterHub library's own logits
(every drop depth, full and pruned adapter sets), static fusion against the reference, exporter errors."""
import json
import os
import shutil

import numpy as np
import pytest
from conftest import FIX

from adapterdrop_tools import ExportError, InvalidCheckpoint, UnsupportedAdapter
from adapterdrop_tools.adapterhub import load_adapter, load_head
from adapterdrop_tools.checkpoint import load_checkpoint
from adapterdrop_tools.fusion import load_fusion
from adapterdrop_tools.fusion_task import prune_task, rank
from adapterdrop_tools.pipeline import Pipeline
from adapterdrop_tools.reference import Reference, fusion_logits, fusion_slot
from test_onnx_pipeline import check_against_expected

BT = os.path.join(FIX, "bert-tiny")
LIB = {"fusion": "fusion:fa,fb,fc", "fusion-pruned": "fusion:fa,fc"}


@pytest.fixture(scope="module")
def bert_fusion():
    ck = load_checkpoint(os.path.join(BT, "backbone"))
    fusion = load_fusion(os.path.join(BT, "fusion"), 2, 32)
    adapters = {n: load_adapter(os.path.join(BT, "adapters", n), 2, 32) for n in ("fa", "fb", "fc")}
    return Reference(ck), fusion, adapters, load_head(os.path.join(BT, "fusion"), 32)


def test_fixture_is_dynamic_fusion(bert_fusion):
    _, fusion, _, head = bert_fusion
    assert fusion.config_name == "dynamic" and fusion.adapter_names == ["fa", "fb", "fc"]
    assert sorted(fusion.slots) == [(0, "ffn"), (1, "ffn")] and head.labels == ["no", "yes"]


@pytest.mark.parametrize("kept", [None, ["fa", "fc"]])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_reference_equals_library(bert_fusion, bert_fixture, kept, n):
    ref, fusion, adapters, head = bert_fusion
    keep = {k: kept for k in fusion.slots} if kept else None
    got = fusion_logits(ref, bert_fixture["input_ids"], bert_fixture["attention_mask"], None, fusion, adapters, head,
                        keep, range(n))
    want = bert_fixture["logits"]["fusion:fa,fc" if kept else "fusion:fa,fb,fc"][str(n)]
    assert np.abs(got - np.array(want)).max() <= 1e-6


@pytest.mark.parametrize("task", ["fusion", "fusion-pruned"])
@pytest.mark.parametrize("n", [0, 1, 2])
def test_exported_graphs_equal_library(test_repo, backbone_cache, bert_fixture, task, n):
    p = Pipeline(test_repo, task, 1, backbone_cache)
    got = p.logits(bert_fixture["input_ids"], bert_fixture["attention_mask"], None, range(n))
    assert np.abs(got - np.array(bert_fixture["logits"][LIB[task]][str(n)])).max() <= 1e-4


@pytest.mark.parametrize("task", ["fusion", "fusion-pruned", "fusion-static"])
def test_exported_graphs_equal_reference(test_repo, backbone_cache, task):
    assert check_against_expected(test_repo, task, backbone_cache, 1e-4) >= 4


def test_alpha_is_a_distribution_and_matches_reference(test_repo, backbone_cache, bert_fusion, bert_fixture):
    ref, fusion, adapters, _ = bert_fusion
    p = Pipeline(test_repo, "fusion", 1, backbone_cache)
    ids, mask = np.asarray(bert_fixture["input_ids"]), np.asarray(bert_fixture["attention_mask"])
    x = p.backbone.embeddings(ids, np.zeros_like(ids))
    seg = p.backbone.layers[0]
    x1 = seg["attention_slot"].run(["y"], {"h": seg["attention"].run(["h"], {"hidden": x, "attention_mask": mask})[0], "x": x})[0]
    h2 = seg["ffn"].run(["h"], {"hidden": x1})[0]
    slot = p.task.slots[0]["ffn"]
    y = slot.run(["y"], {"h": h2, "x": x1})[0]
    want_y, want_alpha = fusion_slot(ref, 0, "ffn", h2.astype(np.float64), x1.astype(np.float64), fusion,
                                     [adapters[n] for n in ("fa", "fb", "fc")])
    assert np.abs(y - want_y).max() <= 1e-5
    assert np.abs(slot.last_alpha - want_alpha).max() <= 1e-5
    assert np.allclose(slot.last_alpha.sum(-1), 1.0, atol=1e-5)


def test_static_fusion_has_no_value_and_two_locations(test_repo):
    m = json.load(open(os.path.join(test_repo, "tasks", "fusion-static", "1", "task.json")))
    assert m["adapter"]["fusion_config"] == "static"
    assert {s["location"] for s in m["slots"]} == {"attention", "ffn"}


def test_pruned_task_reuses_fusion_graph_bytes(test_repo):
    base = os.path.join(test_repo, "tasks")
    for f in ("fusion/layer0_ffn.onnx", "adapters/fa/layer1_ffn.onnx", "head.onnx"):
        a, b = (open(os.path.join(base, t, "1", f), "rb").read() for t in ("fusion", "fusion-pruned"))
        assert a == b, f
    assert not os.path.exists(os.path.join(base, "fusion-pruned", "1", "adapters", "fb"))


def test_rank_per_layer_and_global():
    w = {"0:ffn": {"a": 0.5, "b": 0.3, "c": 0.2}, "1:ffn": {"a": 0.1, "b": 0.3, "c": 0.6}}
    assert rank(w, 1, "per-layer") == {"0:ffn": ["a"], "1:ffn": ["c"]}
    g = rank(w, 2, "global")  # means: a .3, b .3, c .4
    assert g["0:ffn"] == g["1:ffn"] and set(g["0:ffn"]) == {"c", "a"}
    with pytest.raises(ExportError):
        rank(w, 0, "global")


def test_prune_refuses_unknown_adapter(test_repo, tmp_path):
    with pytest.raises(ExportError, match="not in"):
        prune_task(test_repo, "fusion", 1, {"0:ffn": ["zz"], "1:ffn": ["fa"]}, "bad-prune", 1)


def test_temperature_and_missing_weights_are_refused(tmp_path):
    d = tmp_path / "f"
    shutil.copytree(os.path.join(BT, "fusion"), d)
    cfg = json.load(open(d / "adapter_fusion_config.json"))
    cfg["config"]["temperature"] = True
    json.dump(cfg, open(d / "adapter_fusion_config.json", "w"))
    with pytest.raises(UnsupportedAdapter, match="temperature"):
        load_fusion(str(d), 2, 32)
    cfg["config"]["temperature"] = False
    json.dump(cfg, open(d / "adapter_fusion_config.json", "w"))
    with pytest.raises(InvalidCheckpoint, match="hidden"):
        load_fusion(str(d), 2, 64)
    from safetensors.numpy import load_file, save_file
    t = load_file(str(d / "model_adapter_fusion.safetensors"))
    t.pop("bert.encoder.layer.1.output.adapter_fusion_layer.fa,fb,fc.value.weight")
    save_file(t, str(d / "model_adapter_fusion.safetensors"))
    with pytest.raises(ExportError, match="value.weight"):
        load_fusion(str(d), 2, 32)


@pytest.mark.parametrize("form", ["reassociated", "library"])
def test_export_fusion_cli_writes_a_task_equal_to_the_library(tmp_path, bert_fixture, form):
    import export_backbone
    import export_fusion
    repo = str(tmp_path / "repo")
    assert export_backbone.main(["--checkpoint", os.path.join(BT, "backbone"), "--out", repo, "--name", "bt"]) == 0
    args = ["--repo", repo, "--backbone", "bt", "--fusion", os.path.join(BT, "fusion"), "--name", "fz", "--version", "1",
            "--drop-first", "1", "--graph-form", form] + sum((["--adapter", os.path.join(BT, "adapters", n)] for n in ("fa", "fb", "fc")), [])
    assert export_fusion.main(args) == 0
    p = Pipeline(repo, "fz", 1, {})
    assert [s["layer"] for s in p.task.manifest["slots"]] == [1]  # layer 0 always dropped: not written
    assert p.task.manifest["adapter"]["fusion_graph_form"] == form
    got = p.logits(bert_fixture["input_ids"], bert_fixture["attention_mask"], None, [0])
    assert np.abs(got - np.array(bert_fixture["logits"]["fusion:fa,fb,fc"]["1"])).max() <= 1e-4
    # A fused adapter left out is an error naming it; nothing is written.
    bad = args[:-2] + ["--force"]
    assert export_fusion.main(bad[:bad.index("--name") + 1] + ["fz2"] + bad[bad.index("--name") + 2:]) == 2
    assert not os.path.exists(os.path.join(repo, "tasks", "fz2"))
    # A plain adapter directory is not a fusion.
    assert export_fusion.main(["--repo", repo, "--backbone", "bt", "--fusion", os.path.join(BT, "adapters", "fa"),
                               "--adapter", os.path.join(BT, "adapters", "fa"), "--name", "fz3", "--version", "1",
                               "--drop-first", "0"]) == 2
