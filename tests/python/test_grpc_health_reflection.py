"""grpc.health.v1 and grpc.reflection.v1 as seen by a stock grpcio client."""
import importlib
import sys

import grpc
import pytest

health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2", reason="grpcio-health-checking is not installed")
health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")

# grpcio-reflection only ships the v1alpha client protos, and the server serves
# grpc.reflection.v1. This is the subset of the upstream grpc/reflection/v1/reflection.proto
# the tests need (same package, names and field numbers, hence wire-identical).
REFLECTION_V1_SUBSET = """
syntax = "proto3";
package grpc.reflection.v1;

service ServerReflection {
  rpc ServerReflectionInfo(stream ServerReflectionRequest) returns (stream ServerReflectionResponse);
}
message ServerReflectionRequest {
  string host = 1;
  oneof message_request {
    string file_by_filename = 3;
    string file_containing_symbol = 4;
    string list_services = 7;
  }
}
message ServerReflectionResponse {
  string valid_host = 1;
  ServerReflectionRequest original_request = 2;
  oneof message_response {
    FileDescriptorResponse file_descriptor_response = 4;
    ListServiceResponse list_services_response = 6;
    ErrorResponse error_response = 7;
  }
}
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ServiceResponse { string name = 1; }
message ErrorResponse {
  int32 error_code = 1;
  string error_message = 2;
}
"""


@pytest.fixture(scope="module")
def health(channel):
    return health_pb2_grpc.HealthStub(channel)


@pytest.mark.parametrize("service", ["", "sent", "adapterdrop.v1.Inference"])
def test_health_serving(health, service):
    resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_every_expected_task_is_serving(health, expected):
    for name in expected["tasks"]:
        resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, name


def test_health_unknown_service_is_not_found(health):
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no-such-service"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_streams_serving(health):
    stream = health.Watch(health_pb2.HealthCheckRequest(service="sent"), timeout=10)
    try:
        first = next(stream)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stream.cancel()


@pytest.fixture(scope="module")
def reflection_pb2(tmp_path_factory):
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("reflection")
    src = out / "src" / "grpc_reflection_v1_subset.proto"
    src.parent.mkdir()
    src.write_text(REFLECTION_V1_SUBSET, encoding="utf-8")
    if protoc.main(["protoc", f"-I{src.parent}", f"--python_out={out}", str(src)]) != 0:
        pytest.fail("grpc_tools.protoc failed on the reflection v1 subset", pytrace=False)
    sys.path.insert(0, str(out))
    try:
        importlib.invalidate_caches()
        return importlib.import_module("grpc_reflection_v1_subset_pb2")
    finally:
        sys.path.remove(str(out))


def _reflect(channel, pb2, **request):
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=pb2.ServerReflectionResponse.FromString,
    )
    responses = list(call(iter([pb2.ServerReflectionRequest(**request)]), timeout=10))
    assert len(responses) == 1
    return responses[0]


def test_reflection_v1_lists_services(channel, reflection_pb2):
    resp = _reflect(channel, reflection_pb2, list_services="")
    assert resp.WhichOneof("message_response") == "list_services_response"
    names = {s.name for s in resp.list_services_response.service}
    assert "adapterdrop.v1.Inference" in names
    assert "grpc.health.v1.Health" in names


def test_reflection_v1_describes_inference(channel, reflection_pb2):
    from google.protobuf import descriptor_pb2

    resp = _reflect(channel, reflection_pb2, file_containing_symbol="adapterdrop.v1.Inference")
    assert resp.WhichOneof("message_response") == "file_descriptor_response"
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in resp.file_descriptor_response.file_descriptor_proto]
    services = {f"{f.package}.{s.name}": {m.name for m in s.method} for f in files for s in f.service}
    assert services.get("adapterdrop.v1.Inference") == {"Infer", "InferStream", "ListTasks", "GetTask"}


def test_reflection_v1_unknown_symbol_is_not_found(channel, reflection_pb2):
    # The reflection spec answers with an error_response; tonic-reflection ends the stream
    # with a NOT_FOUND status instead. Either is a clean "not found".
    try:
        resp = _reflect(channel, reflection_pb2, file_containing_symbol="no.such.Symbol")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND
    else:
        assert resp.WhichOneof("message_response") == "error_response"
        assert resp.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
