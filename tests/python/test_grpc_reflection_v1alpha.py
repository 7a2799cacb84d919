"""gRPC reflection as stock clients speak it (grpc.reflection.v1alpha), on the inference and the admin port:
grpcio-reflection's own descriptor database and the `grpc_requests` client list the services, resolve
the descriptors and call an RPC through them, with nothing compiled from our protos."""
import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory

reflection_db = pytest.importorskip("grpc_reflection.v1alpha.proto_reflection_descriptor_database",
                                    reason="grpcio-reflection is not installed (make setup)")
grpc_requests = pytest.importorskip("grpc_requests", reason="grpc-requests is not installed (make setup)")

PORTS = {
    "inference": {"adapterdrop.v1.Inference", "inference.GRPCInferenceService", "grpc.health.v1.Health",
                  "grpc.reflection.v1alpha.ServerReflection"},
    "admin": {"adapterdrop.v1.Admin", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"},
}
# One RPC per port called through the reflected descriptors: (service, method, request).
CALLS = {"inference": ("adapterdrop.v1.Inference", "ListTasks", {}), "admin": ("adapterdrop.v1.Admin", "ListTasks", {})}


@pytest.fixture(scope="module")
def addrs(server):
    return {"inference": server.addr, "admin": server.admin_addr()}


@pytest.mark.parametrize("port", PORTS)
def test_grpcio_reflection_descriptor_database_lists_and_calls(addrs, port, expected):
    with grpc.insecure_channel(addrs[port]) as channel:
        db = reflection_db.ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert PORTS[port] <= services, services
        pool = descriptor_pool.DescriptorPool(db)
        service, name, _ = CALLS[port]
        method = pool.FindMethodByName(f"{service}.{name}")
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(f"/{service}/{name}", request_serializer=request.SerializeToString,
                                   response_deserializer=response.FromString)
        listed = {t.name for t in call(request(), timeout=30).tasks}
        assert set(expected["tasks"]) <= listed
        # KServe too, on the inference port: its descriptors resolve through the same database.
        if port == "inference":
            live = pool.FindMethodByName("inference.GRPCInferenceService.ServerLive")
            call = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                       request_serializer=message_factory.GetMessageClass(live.input_type).SerializeToString,
                                       response_deserializer=message_factory.GetMessageClass(live.output_type).FromString)
            assert call(message_factory.GetMessageClass(live.input_type)(), timeout=30).live


@pytest.mark.parametrize("port", PORTS)
def test_grpc_requests_client_lists_and_calls(addrs, port, expected):
    # A private pool: tritonclient (other tests) puts its own `inference` protos in the default one.
    client = grpc_requests.Client.get_by_endpoint(addrs[port], descriptor_pool=descriptor_pool.DescriptorPool())
    assert PORTS[port] - {"grpc.reflection.v1alpha.ServerReflection"} <= set(client.service_names), client.service_names
    service, name, request = CALLS[port]
    listed = {t["name"] for t in client.request(service, name, request, timeout=30)["tasks"]}
    assert set(expected["tasks"]) <= listed
    if port == "inference":
        reply = client.request("adapterdrop.v1.Inference", "Infer",
                               {"tasks": [{"name": "sent", "drop_first": 1}], "texts": {"texts": ["a gripping film"]}},
                               timeout=60)
        assert reply["results"][0]["dropped_layers"] == [0]
        assert reply["results"][0]["sequences"][0]["label"] in expected["tasks"]["sent"]["labels"]
