"""tools/register_task.py against a real server with an admin token: upload an exported task
directory, convert and upload an AdapterHub adapter, refuse a bundle whose head fails the trial
run, pin, list and remove. The server runs on a private copy of the test repository."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import register_task  # noqa: E402
from adapterdrop_tools.fixtures import adapterhub_tiny  # noqa: E402
from adapterdrop_tools.served import Server  # noqa: E402

TOKEN = "py-admin-token"
FIXTURE_ADAPTERS = Path(adapterhub_tiny()) / "bert-tiny" / "adapters"


def _test_repo() -> Path:
    return Path(os.environ.get("ADAPTERDROP_TEST_REPO", ROOT / "build" / "test-repo"))


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("admin-repo")
    shutil.copytree(_test_repo() / "backbones" / "bert-tiny", repo / "backbones" / "bert-tiny")
    shutil.copytree(_test_repo() / "tasks" / "sent", repo / "tasks" / "sent")
    exe = next(p for p in (ROOT / "target" / "debug" / "adapterdrop-serve", ROOT / "target" / "release" / "adapterdrop-serve") if p.is_file())
    # served.Server: every port (inference, admin, metrics) ephemeral; a failed start shows the log.
    try:
        srv = Server(exe, repo, timeout_s=120, extra_env={"ADAPTERDROP__AUTH__ADMIN_TOKEN": TOKEN})
        admin = srv.admin_addr()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield {"addr": srv.addr, "admin": admin, "repo": repo, "server": srv}
    srv.stop(20)


@pytest.fixture(scope="module")
def clients(admin_server):
    pb, pb_grpc = register_task.stubs()
    from adapterdrop.v1 import adapterdrop_pb2 as core
    from adapterdrop.v1 import adapterdrop_pb2_grpc as core_grpc

    admin = pb_grpc.AdminStub(grpc.insecure_channel(admin_server["admin"]))
    inference = core_grpc.InferenceStub(grpc.insecure_channel(admin_server["addr"]))
    return pb, core, admin, inference


def logits(core, inference, task, drop=None):
    ref = core.TaskRef(name=task)
    if drop is not None:
        ref.drop_first = drop
    req = core.InferRequest(tasks=[ref], texts=core.Texts(texts=["a gripping film", "dull"]))
    return np.array([list(s.logits) for s in inference.Infer(req).results[0].sequences])


def cli(admin_server, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "register_task.py"), "--addr", admin_server["admin"],
                           "--token", TOKEN, *args], capture_output=True, text=True, timeout=120)


def test_cli_uploads_a_directory_and_an_adapterhub_adapter(admin_server, clients):
    pb, core, admin, inference = clients
    out = cli(admin_server, "register", "--name", "py-dir", "--dir", str(_test_repo() / "tasks" / "sent" / "1"))
    assert out.returncode == 0, out.stderr
    assert "registered py-dir@1" in out.stdout
    # The AdapterHub adapter the test repository's `sent` was exported from, converted client-side.
    out = cli(admin_server, "register", "--name", "py-hub", "--adapter", str(FIXTURE_ADAPTERS / "sent"),
              "--repo", str(admin_server["repo"]), "--backbone", "bert-tiny", "--robust", "0,0,2", "--set-default")
    assert out.returncode == 0, out.stderr
    assert "registered py-hub@1" in out.stdout and "default" in out.stdout
    for drop in (0, 1, 2):
        want = logits(core, inference, "sent", drop)
        np.testing.assert_allclose(logits(core, inference, "py-dir", drop), want, atol=0)
        np.testing.assert_allclose(logits(core, inference, "py-hub", drop), want, atol=1e-5)
    listed = cli(admin_server, "list")
    assert "py-hub@1 TASK_STATUS_READY default pinned" in listed.stdout, listed.stdout
    out = cli(admin_server, "unregister", "--name", "py-dir", "--all")
    assert out.returncode == 0 and "removed py-dir@1" in out.stdout, out.stderr


def test_missing_token_is_refused(admin_server):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "register_task.py"), "--addr", admin_server["admin"], "list"],
                         capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "ADAPTERDROP_ADMIN_TOKEN"})
    assert out.returncode == 2
    assert "UNAUTHENTICATED" in out.stderr and "auth.admin_token" in out.stderr


def nan_head(path: Path, hidden: int, labels: int):
    """A head whose declared I/O matches the contract but whose output is NaN: only running it shows."""
    w = numpy_helper.from_array(np.ones((hidden, labels), np.float32), "w")
    idx = numpy_helper.from_array(np.array(0, np.int64), "idx")
    minus = numpy_helper.from_array(np.array(-1.0, np.float32), "minus")
    nodes = [helper.make_node("Gather", ["hidden", "idx"], ["first"], axis=1),
             helper.make_node("MatMul", ["first", "w"], ["z"]),
             helper.make_node("Abs", ["z"], ["a"]),
             helper.make_node("Add", ["a", "minus"], ["b"]),
             helper.make_node("Abs", ["b"], ["c"]),
             helper.make_node("Neg", ["c"], ["d"]),
             helper.make_node("Add", ["d", "minus"], ["e"]),
             helper.make_node("Sqrt", ["e"], ["logits"])]
    graph = helper.make_graph(nodes, "nan_head",
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", hidden])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", labels])],
                              [w, idx, minus])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))


def test_trial_run_refuses_a_head_that_only_fails_when_run(admin_server, clients, tmp_path):
    pb, core, admin, inference = clients
    bundle = tmp_path / "bundle"
    shutil.copytree(_test_repo() / "tasks" / "sent" / "1", bundle)
    nan_head(bundle / "head.onnx", 32, 2)
    before = sorted(p.name for p in (admin_server["repo"] / "tasks").iterdir())
    with pytest.raises(grpc.RpcError) as err:
        register_task.register(admin, pb, str(bundle), "nan-head", TOKEN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "head.onnx" in err.value.details() and "trial run" in err.value.details() and "non-finite" in err.value.details()
    assert sorted(p.name for p in (admin_server["repo"] / "tasks").iterdir()) == before


def test_cli_registers_adapterhub_weights_only(admin_server, clients, tmp_path):
    """--weights-only uploads the AdapterHub files themselves; the server validates them, writes
    task.json (labels from head_config.json) and keeps them; a broken file is refused by name."""
    pb, core, admin, inference = clients
    hub = _test_repo() / "tasks" / "sent" / "1" / "adapterhub"
    out = cli(admin_server, "register", "--name", "py-weights", "--weights-only", "--adapter", str(hub),
              "--backbone", "bert-tiny", "--robust", "1,0,2")
    assert out.returncode == 0, out.stderr
    assert "registered py-weights@1 (4 files" in out.stdout, out.stdout
    md = [("authorization", f"Bearer {TOKEN}")]
    info = admin.GetTask(core.GetTaskRequest(name="py-weights"), metadata=md)
    sent = admin.GetTask(core.GetTaskRequest(name="sent"), metadata=md)
    assert info.status == core.TASK_STATUS_READY and list(info.labels) == list(sent.labels)
    assert info.drop.robust.default == 1 and info.drop.robust.max == 2
    assert (admin_server["repo"] / "tasks" / "py-weights" / "1" / "adapterhub" / "adapter.safetensors").read_bytes() == \
        (hub / "adapter.safetensors").read_bytes()
    # Served on the adapter banks: the same logits as `sent`, the exported bundle of the same adapter.
    assert np.abs(logits(core, inference, "py-weights", 1) - logits(core, inference, "sent", 1)).max() <= 1e-6

    bad = tmp_path / "bad"
    shutil.copytree(hub, bad)
    cfg = (bad / "adapter_config.json").read_text().replace('"relu"', '"leakyrelu"')
    (bad / "adapter_config.json").write_text(cfg)
    out = cli(admin_server, "register", "--name", "py-bad", "--weights-only", "--adapter", str(bad),
              "--backbone", "bert-tiny", "--drop-first", "0")
    assert out.returncode == 2 and "INVALID_ARGUMENT" in out.stderr and "adapter_config.json" in out.stderr, out.stderr
    assert not (admin_server["repo"] / "tasks" / "py-bad").exists()
