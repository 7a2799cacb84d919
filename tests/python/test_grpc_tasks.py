"""ListTasks / GetTask over grpcio."""
import grpc
import pytest


def _drop_of(info):
    mode = info.drop.WhichOneof("mode")
    if mode == "robust":
        r = info.drop.robust
        return {"robust": {"default": r.default, "min": r.min, "max": r.max}}
    if mode == "drop_first":
        return {"drop_first": info.drop.drop_first}
    if mode == "layers":
        return {"layers": list(info.drop.layers.layers)}
    return {}


def test_list_tasks_has_every_expected_task_ready(stub, pb, expected):
    resp = stub.ListTasks(pb.ListTasksRequest(), timeout=10)
    by_name = {t.name: t for t in resp.tasks}
    missing = sorted(set(expected["tasks"]) - set(by_name))
    assert not missing, f"tasks missing from ListTasks: {missing}"
    for name, want in expected["tasks"].items():
        info = by_name[name]
        assert info.status == pb.TASK_STATUS_READY, f"{name}: {info.status_reason}"
        assert info.version == want["version"]
        assert info.is_default_version
        assert info.backbone == want["backbone"]
        assert list(info.labels) == want["labels"]
        assert _drop_of(info) == want["drop"]


@pytest.mark.parametrize("name", ["sent", "topic", "score", "sent-spec", "sent-layers"])
def test_get_task_returns_drop_config_and_labels(stub, pb, expected, name):
    want = expected["tasks"][name]
    info = stub.GetTask(pb.GetTaskRequest(name=name), timeout=10)
    assert info.name == name and info.version == want["version"]
    assert info.status == pb.TASK_STATUS_READY
    assert info.head_type == want["kind"]
    assert list(info.labels) == want["labels"]
    assert _drop_of(info) == want["drop"]
    assert info.slots, "a task has at least one adapter slot"
    # An explicit version gives the same answer.
    again = stub.GetTask(pb.GetTaskRequest(name=name, version=want["version"]), timeout=10)
    assert again == info


def test_get_unknown_task_is_not_found(stub, pb):
    with pytest.raises(grpc.RpcError) as err:
        stub.GetTask(pb.GetTaskRequest(name="no-such-task"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
