"""A request whose protobuf does not decode is the client's fault: INVALID_ARGUMENT with the decoder's
message (which field, what is wrong), on every method of every service of both ports; never INTERNAL.
Raw bytes over a generic grpcio channel, so nothing client-side can clean them up."""
import grpc
import pytest

from . import wire

CASES = [(port, m) for port, services in wire.PORT_SERVICES.items() for s in services for m in wire.methods(s)]


@pytest.fixture(scope="module")
def channels(server):
    with grpc.insecure_channel(server.addr) as inference, grpc.insecure_channel(server.admin_addr()) as admin:
        yield {"inference": inference, "admin": admin}


@pytest.mark.parametrize("port,method", CASES, ids=[f"{p}:{m.path}" for p, m in CASES])
def test_undecodable_request_is_invalid_argument(channels, port, method):
    for kind, payload in wire.undecodable(method.input).items():
        code, details, _ = wire.call(channels[port], method, [payload], timeout=30)
        # InferStream / ModelStreamInfer too: the stream ends with the codec's error (issue 13 item 17).
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{kind}: {code} {details}"
        assert "undecodable" in details and method.input.name in details, f"{kind}: {details}"


def test_the_decoder_message_names_the_field(channels):
    infer = next(m for m in wire.methods(wire.NATIVE) if m.name == "Infer")
    code, details, _ = wire.call(channels["inference"], infer, [wire.undecodable(infer.input)["invalid UTF-8"]], timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "InferRequest.id" in details and "UTF-8" in details, details
    # The server is unharmed: a valid request still works.
    ok = wire.message("adapterdrop.v1.InferRequest")(tasks=[{"name": "sent"}], texts={"texts": ["fine"]})
    code, details, out = wire.call(channels["inference"], infer, [ok.SerializeToString()], timeout=60)
    assert code == grpc.StatusCode.OK, details
    assert wire.message("adapterdrop.v1.InferResponse").FromString(out[0]).results[0].sequences[0].label
