"""Bad requests get the right gRPC status codes over grpcio."""
import grpc
import pytest


def _code(stub, req):
    with pytest.raises(grpc.RpcError) as err:
        stub.Infer(req, timeout=10)
    assert err.value.details(), "errors carry a human-readable message"
    return err.value.code()


def test_unknown_task_is_not_found(stub, pb):
    req = pb.InferRequest(tasks=[pb.TaskRef(name="no-such-task")], texts=pb.Texts(texts=["hello"]))
    assert _code(stub, req) == grpc.StatusCode.NOT_FOUND


def test_unknown_version_is_not_found(stub, pb):
    req = pb.InferRequest(tasks=[pb.TaskRef(name="sent", version=999)], texts=pb.Texts(texts=["hello"]))
    assert _code(stub, req) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda pb: pb.InferRequest(tasks=[pb.TaskRef(name="sent")], texts=pb.Texts(texts=[])), id="empty-texts"),
        pytest.param(lambda pb: pb.InferRequest(tasks=[pb.TaskRef(name="sent")], texts=pb.Texts(texts=[""])), id="empty-string"),
        pytest.param(lambda pb: pb.InferRequest(tasks=[pb.TaskRef(name="sent")]), id="no-inputs"),
        pytest.param(lambda pb: pb.InferRequest(texts=pb.Texts(texts=["hello"])), id="no-tasks"),
        pytest.param(
            lambda pb: pb.InferRequest(tasks=[pb.TaskRef(name="sent", drop_first=99)], texts=pb.Texts(texts=["hello"])),
            id="drop-out-of-range",
        ),
        pytest.param(
            lambda pb: pb.InferRequest(tasks=[pb.TaskRef(name="sent-spec", drop_first=0)], texts=pb.Texts(texts=["hello"])),
            id="drop-on-fixed-task",
        ),
        pytest.param(
            lambda pb: pb.InferRequest(tasks=[pb.TaskRef(name="sent"), pb.TaskRef(name="rsent")], texts=pb.Texts(texts=["hello"])),
            id="mixed-backbones",
        ),
        pytest.param(
            lambda pb: pb.InferRequest(tasks=[pb.TaskRef(name="sent")], texts=pb.Texts(texts=["word " * 5000])),
            id="too-long",
        ),
    ],
)
def test_invalid_requests_are_invalid_argument(stub, pb, build):
    assert _code(stub, build(pb)) == grpc.StatusCode.INVALID_ARGUMENT


def test_too_long_input_is_accepted_with_truncate(stub, pb):
    req = pb.InferRequest(tasks=[pb.TaskRef(name="sent")], texts=pb.Texts(texts=["word " * 5000]), truncate=True)
    resp = stub.Infer(req, timeout=30)
    assert len(resp.results[0].sequences) == 1
    assert 0 < resp.num_tokens[0] < 5000


def test_server_keeps_serving_after_errors(stub, pb):
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name="nope")], texts=pb.Texts(texts=["x"])), timeout=10)
    resp = stub.Infer(pb.InferRequest(tasks=[pb.TaskRef(name="sent")], texts=pb.Texts(texts=["fine"])), timeout=10)
    assert resp.results[0].sequences[0].label in ("negative", "positive")
