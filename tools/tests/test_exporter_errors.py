"""export_task.py refuses what it cannot serve with a clear error, and writes nothing."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import FIX, TOOLS
from safetensors.numpy import load_file, save_file

import export_backbone
import export_task

SENT = os.path.join(FIX, "bert-tiny", "adapters", "sent")
BERT = os.path.join(FIX, "bert-tiny", "backbone")


@pytest.fixture()
def repo(tmp_path):
    r = str(tmp_path / "repo")
    assert export_backbone.main(["--checkpoint", BERT, "--out", r, "--name", "bert-tiny"]) == 0
    return r


def adapter_copy(tmp_path, src=SENT, **config_changes):
    d = tmp_path / "adapter"
    shutil.copytree(src, d)
    os.chmod(d, 0o755)
    for f in d.iterdir():
        os.chmod(f, 0o644)
    p = d / "adapter_config.json"
    meta = json.loads(p.read_text())
    meta["config"].update(config_changes)
    p.write_text(json.dumps(meta))
    return str(d)


def run_export(repo, adapter, name="t", extra=()):
    return export_task.main(["--repo", repo, "--backbone", "bert-tiny", "--adapter", adapter, "--name", name,
                             "--version", "1", "--robust", "0,0,2", *extra])


def assert_nothing_written(repo):
    tasks = os.path.join(repo, "tasks")
    assert not os.path.isdir(tasks) or os.listdir(tasks) == []


@pytest.mark.parametrize("change,field", [
    ({"architecture": "lora"}, "architecture"),
    ({"architecture": "prefix_tuning"}, "architecture"),
    ({"use_gating": True}, "use_gating"),
    ({"is_parallel": True}, "is_parallel"),
    ({"phm_layer": True}, "phm_layer"),
    ({"ln_before": True}, "ln_before"),
    ({"ln_after": True}, "ln_after"),
    ({"non_linearity": "leakyrelu"}, "non_linearity"),
    ({"scaling": "learned"}, "scaling"),
    ({"inv_adapter": "nice"}, "inv_adapter"),
])
def test_unsupported_config(repo, tmp_path, capsys, change, field):
    rc = run_export(repo, adapter_copy(tmp_path, **change))
    err = capsys.readouterr().err
    assert rc != 0
    assert "UnsupportedAdapter" in err and field in err, err
    assert_nothing_written(repo)


def test_fusion_dir_unsupported(repo, capsys):
    rc = run_export(repo, os.path.join(FIX, "bert-tiny", "fusion"))
    err = capsys.readouterr().err
    assert rc != 0 and "UnsupportedAdapter" in err and "fusion" in err.lower()
    assert_nothing_written(repo)


def test_missing_weight_names_key(repo, tmp_path, capsys):
    d = adapter_copy(tmp_path)
    st = os.path.join(d, "adapter.safetensors")
    w = load_file(st)
    key = "bert.encoder.layer.1.output.adapters.sent.adapter_up.bias"
    del w[key]
    save_file(w, st)
    rc = run_export(repo, d)
    err = capsys.readouterr().err
    assert rc != 0 and "MissingWeight" in err and key in err, err
    assert_nothing_written(repo)


def test_missing_head_weight_names_key(repo, tmp_path, capsys):
    d = adapter_copy(tmp_path)
    st = os.path.join(d, "model_head.safetensors")
    w = load_file(st)
    del w["heads.sent.4.weight"]
    save_file(w, st)
    rc = run_export(repo, d)
    err = capsys.readouterr().err
    assert rc != 0 and "heads.sent.4.weight" in err
    assert_nothing_written(repo)


def test_cli_exit_code_and_message(repo, tmp_path):
    d = adapter_copy(tmp_path, architecture="lora")
    p = subprocess.run([sys.executable, os.path.join(TOOLS, "export_task.py"), "--repo", repo, "--backbone",
                        "bert-tiny", "--adapter", d, "--name", "t", "--version", "1", "--drop-first", "0"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "UnsupportedAdapter" in p.stderr and "architecture" in p.stderr
    assert_nothing_written(repo)


def test_leave_out_and_versions(repo, tmp_path, capsys):
    d = adapter_copy(tmp_path, leave_out=[0])
    st = os.path.join(d, "adapter.safetensors")
    w = {k: v for k, v in load_file(st).items() if ".layer.0." not in k}
    save_file(w, st)
    assert run_export(repo, d, extra=["--description", "left out"]) == 0
    with open(os.path.join(repo, "tasks", "t", "1", "task.json")) as f:
        m = json.load(f)
    assert [s["layer"] for s in m["slots"]] == [1] and m["description"] == "left out"
    # an existing version is immutable unless --force
    assert run_export(repo, d) != 0
    assert "already exists" in capsys.readouterr().err
    assert run_export(repo, d, extra=["--force"]) == 0
    assert sorted(os.listdir(os.path.join(repo, "tasks"))) == ["t"]


def test_bad_drop_args(repo, capsys):
    rc = export_task.main(["--repo", repo, "--backbone", "bert-tiny", "--adapter", SENT, "--name", "t",
                           "--version", "1", "--robust", "0,0,9"])
    assert rc != 0 and "robust" in capsys.readouterr().err
    assert_nothing_written(repo)


def test_export_task_from_repo_layernorms_equals_checkpoint(repo, tmp_path):
    """LayerNorm weights read back from the backbone's plain slots == from --checkpoint."""
    assert run_export(repo, SENT, name="a") == 0
    assert export_task.main(["--repo", repo, "--backbone", "bert-tiny", "--adapter", SENT, "--name", "b",
                             "--version", "1", "--robust", "0,0,2", "--checkpoint", BERT]) == 0
    for f in ("slots/layer0_ffn.onnx", "slots/layer1_ffn.onnx", "head.onnx"):
        a = open(os.path.join(repo, "tasks", "a", "1", f), "rb").read()
        b = open(os.path.join(repo, "tasks", "b", "1", f), "rb").read()
        assert a.replace(b"a_layer", b"b_layer") == b


def test_sentence_transformers_pooling_is_carried_or_refused_by_name(tmp_path):
    """backbone.json `embedding` follows modules.json and the Pooling config; what the server cannot
    compute (max pooling, a Dense module) is refused naming it."""
    from adapterdrop_tools import ExportError
    from adapterdrop_tools.repository import embedding_config

    assert embedding_config(str(tmp_path)) == {"pooling": "mean", "normalize": False}
    (tmp_path / "pool").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert embedding_config(str(tmp_path)) == {"pooling": "cls", "normalize": True}
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ExportError, match=r"pooling \['pooling_mode_max_tokens'\] is not supported"):
        embedding_config(str(tmp_path))
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]))
    with pytest.raises(ExportError, match="module 'sentence_transformers.models.Dense' is not supported"):
        embedding_config(str(tmp_path))
