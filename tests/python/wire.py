"""Raw gRPC calls from the server's own protos: every service and method, messages built from a private
descriptor pool (no clash with tritonclient's `inference` protos in the default pool), and hand-made
undecodable payloads. Used by the decoding-error, reflection and fuzz tests."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ("adapterdrop/v1/adapterdrop.proto", "adapterdrop/v1/admin.proto", "kserve/grpc_service.proto")
NATIVE, KSERVE, ADMIN = "adapterdrop.v1.Inference", "inference.GRPCInferenceService", "adapterdrop.v1.Admin"
# Which port serves which service.
PORT_SERVICES = {"inference": (NATIVE, KSERVE), "admin": (ADMIN,)}


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    input: object  # google.protobuf.descriptor.Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


_POOL = None


def pool() -> descriptor_pool.DescriptorPool:
    """A private pool with the server's protos, compiled by grpc_tools' protoc."""
    global _POOL
    if _POOL is None:
        from grpc_tools import protoc

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "fds.bin"
            args = ["protoc", f"-I{ROOT / 'proto'}", f"--descriptor_set_out={out}", "--include_imports", *PROTOS]
            if protoc.main(args) != 0:
                raise RuntimeError(f"grpc_tools.protoc failed on {PROTOS}")
            fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
        p = descriptor_pool.DescriptorPool()
        for f in fds.file:
            p.Add(f)
        _POOL = p
    return _POOL


def message(full_name: str):
    """The message class of `full_name` (e.g. "adapterdrop.v1.InferRequest")."""
    return message_factory.GetMessageClass(pool().FindMessageTypeByName(full_name))


def methods(service: str) -> list[Method]:
    s = pool().FindServiceByName(service)
    return [Method(service, m.name, m.input_type, m.client_streaming, m.server_streaming) for m in s.methods]


def call(channel: grpc.Channel, method: Method, payloads: list[bytes], timeout: float, metadata=None):
    """Sends raw request bytes (one message unless client-streaming); returns (status code, details,
    response messages as bytes). Never raises for a gRPC status."""
    kw = {"request_serializer": None, "response_deserializer": None}
    try:
        if method.client_streaming and method.server_streaming:
            out = list(channel.stream_stream(method.path, **kw)(iter(payloads), timeout=timeout, metadata=metadata))
        elif method.client_streaming:
            out = [channel.stream_unary(method.path, **kw)(iter(payloads), timeout=timeout, metadata=metadata)]
        elif method.server_streaming:
            out = list(channel.unary_stream(method.path, **kw)(payloads[0], timeout=timeout, metadata=metadata))
        else:
            out = [channel.unary_unary(method.path, **kw)(payloads[0], timeout=timeout, metadata=metadata)]
        return grpc.StatusCode.OK, "", out
    except grpc.RpcError as e:
        return e.code(), e.details() or "", []


# --- protobuf wire format, by hand -------------------------------------------------------------

def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, body: bytes) -> bytes:
    return tag(number, 2) + varint(len(body)) + body


def string_path(desc, seen=()) -> list | None:
    """Field numbers from `desc` down to a string field (through message fields), or None."""
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_STRING:
            return [f.number]
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.full_name not in seen:
            sub = string_path(f.message_type, seen + (desc.full_name,))
            if sub:
                return [f.number, *sub]
    return None


def nest(path: list, leaf: bytes) -> bytes:
    """`leaf` (a string field's bytes) wrapped in the messages along `path`."""
    body = length_delimited(path[-1], leaf)
    for number in reversed(path[:-1]):
        body = length_delimited(number, body)
    return body


def undecodable(desc) -> dict[str, bytes]:
    """Payloads that are not valid protobuf for `desc`, by kind. Every kind fails whatever the
    message (unknown fields are skipped, so each break is in how the bytes parse or in a known field)."""
    kinds = {
        # A length-delimited field that claims more bytes than follow.
        "truncated": tag(1, 2) + varint(100) + b"abc",
        # A varint that never ends (11 continuation bytes).
        "bad varint": tag(1, 0) + b"\xff" * 11,
        # Wire type 7 does not exist.
        "bad wire type": tag(1, 7) + b"\x00",
        # An end-group marker with no start.
        "stray end group": tag(1, 4),
    }
    path = string_path(desc)
    if path:
        kinds["invalid UTF-8"] = nest(path, b"\xc3\x28 not utf-8 \xff")
    if desc.fields:
        f = desc.fields[0]
        # The first known field sent with a wire type its type does not have.
        length_like = f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_BYTES)
        if length_like or f.is_repeated:
            kinds["wrong wire type"] = tag(f.number, 5) + b"\x00\x00\x00\x00"  # fixed32 where none can be
        else:
            kinds["wrong wire type"] = length_delimited(f.number, b"abc")  # bytes for a scalar
    return kinds
