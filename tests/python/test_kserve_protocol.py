"""KServe v2 protocol conformance: our protos against the canonical ones shipped in tritonclient,
message-size limits, and malformed tensors sent with the canonical protobuf classes over grpcio."""
import struct

import grpc
import numpy as np
import pytest

service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2", reason="tritonclient[grpc] is not installed (make setup)")
service_pb2_grpc = pytest.importorskip("tritonclient.grpc.service_pb2_grpc")
from google.protobuf import descriptor_pb2  # noqa: E402

from .test_grpc_health_reflection import REFLECTION_V1_SUBSET, _reflect, reflection_pb2  # noqa: E402,F401


@pytest.fixture(scope="module")
def kserve(server):
    # tritonclient's own channel options: messages up to 2 GiB each way.
    opts = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
    ch = grpc.insecure_channel(server.addr, options=opts)
    yield service_pb2_grpc.GRPCInferenceServiceStub(ch)
    ch.close()


def _fields(files):
    """{full message name: {field name: (number, type, label, type_name)}} of descriptor files."""
    out = {}

    def walk(prefix, msg):
        name = f"{prefix}.{msg.name}"
        out[name] = {f.name: (f.number, f.type, f.label, f.type_name) for f in msg.field}
        for nested in msg.nested_type:
            walk(name, nested)

    for f in files:
        for m in f.message_type:
            walk(f".{f.package}", m)
    return out


def test_our_protos_are_wire_compatible_with_tritonclients(channel, reflection_pb2):  # noqa: F811
    resp = _reflect(channel, reflection_pb2, file_containing_symbol="inference.GRPCInferenceService")
    ours = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in resp.file_descriptor_response.file_descriptor_proto]
    assert {f.package for f in ours} == {"inference"}
    canonical = []
    for module in (service_pb2, pytest.importorskip("tritonclient.grpc.model_config_pb2")):
        fd = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fd)
        canonical.append(fd)
    mine, theirs = _fields(ours), _fields(canonical)
    assert len(mine) > 40
    for message, fields in mine.items():
        assert message in theirs, f"{message} is not in the canonical protos"
        for name, spec in fields.items():
            assert theirs[message].get(name) == spec, f"{message}.{name}: ours {spec}, canonical {theirs[message].get(name)}"
    # Every RPC we declare exists with the same types and streaming.
    (svc,) = [s for f in ours for s in f.service]
    (canon,) = [s for f in canonical for s in f.service]
    canon_methods = {m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming) for m in canon.method}
    for m in svc.method:
        assert canon_methods[m.name] == (m.input_type, m.output_type, m.client_streaming, m.server_streaming), m.name
    assert len(svc.method) == 12


def test_unimplemented_canonical_rpc_is_unimplemented(kserve):
    with pytest.raises(grpc.RpcError) as err:
        kserve.SystemSharedMemoryStatus(service_pb2.SystemSharedMemoryStatusRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _text(name="TEXT", items=(b"hello there",), shape=None, raw=True):
    t = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype="BYTES", shape=shape or [len(items), 1])
    if not raw:
        t.contents.bytes_contents.extend(items)
    return t, b"".join(struct.pack("<I", len(s)) + s for s in items)


def _request(*tensors, raw=True, model="sent", **kw):
    req = service_pb2.ModelInferRequest(model_name=model, **kw)
    for t, data in tensors:
        req.inputs.append(t)
        if raw:
            req.raw_input_contents.append(data)
    return req


def _ids(name, arr, datatype="INT64"):
    t = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(arr.shape))
    return t, arr.astype("<i8").tobytes()


def test_typed_contents_equal_raw_contents(kserve):
    texts = (b"a gripping, beautifully shot film", b"short")
    raw = kserve.ModelInfer(_request(_text(items=texts)), timeout=30)
    typed = kserve.ModelInfer(_request(_text(items=texts, raw=False), raw=False), timeout=30)
    assert raw.raw_output_contents == typed.raw_output_contents
    logits = np.frombuffer(raw.raw_output_contents[0], dtype="<f4").reshape(list(raw.outputs[0].shape))
    assert logits.shape == (2, 2) and np.isfinite(logits).all()
    ids = np.array([[101, 2460, 102]], dtype=np.int64)
    t, data = _ids("input_ids", ids)
    typed_ids = _request((t, data), raw=False)
    typed_ids.inputs[0].contents.int64_contents.extend(ids.ravel().tolist())
    assert kserve.ModelInfer(typed_ids, timeout=30).raw_output_contents == kserve.ModelInfer(_request(_ids("input_ids", ids)), timeout=30).raw_output_contents


def _mixed():
    a, b = _text(), _text(name="TEXT_PAIR")
    req = _request(a, b)
    req.inputs[1].contents.bytes_contents.append(b"typed")
    return req


def _short_raw():
    t, data = _ids("input_ids", np.array([[101, 7, 102]]))
    return _request((t, data[:-8]))


def _bad_bytes_prefix():
    t, _ = _text()
    return _request((t, struct.pack("<I", 50) + b"only ten b"))


MALFORMED = [
    ("shape vs raw byte length", _short_raw, "shape [1, 3] holds 3 INT64 elements (24 bytes) but its raw contents have 16 bytes"),
    ("shape vs typed count", lambda: _request(_text(items=(b"a", b"b"), shape=[3, 1], raw=False), raw=False), "shape [3, 1] holds 3 elements but contents.bytes_contents has 2"),
    ("BYTES length prefix past the end", _bad_bytes_prefix, "declares 50 bytes but only 10 remain"),
    ("wrong datatype", lambda: _request(_ids("input_ids", np.array([[101, 102]]), datatype="INT32")), "input `input_ids` has datatype INT32; it must be INT64"),
    ("FP32 text", lambda: _request((service_pb2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="FP32", shape=[1]), b"\0\0\0\0")), "has datatype FP32; it must be BYTES"),
    ("missing input", lambda: _request(), "missing input"),
    ("pair without text", lambda: _request(_text(name="TEXT_PAIR")), "missing input `TEXT`"),
    ("extra input", lambda: _request(_text(), _text(name="IMAGE")), "unknown input `IMAGE`"),
    ("duplicate input", lambda: _request(_text(), _text()), "input `TEXT` appears twice"),
    ("raw and typed mixed", _mixed, "has typed contents while raw_input_contents is used"),
    ("raw entries vs inputs", lambda: service_pb2.ModelInferRequest(model_name="sent", inputs=[_text()[0]], raw_input_contents=[b"", b""]), "raw_input_contents has 2 entries but the request has 1 inputs"),
    ("text and ids together", lambda: _request(_text(), _ids("input_ids", np.array([[101, 102]]))), "alternatives"),
    ("mask shape", lambda: _request(_ids("input_ids", np.array([[101, 7, 102]])), _ids("attention_mask", np.array([[1, 1]]))), "input `attention_mask` has shape [1, 2] but `input_ids` has [1, 3]"),
    ("rank of ids", lambda: _request(_ids("input_ids", np.array([101, 102]))), "has shape [2]; it must be [batch, sequence_length]"),
    ("invalid UTF-8", lambda: _request(_text(items=(b"\xff\xfe",))), "element 0 is not valid UTF-8"),
    ("unknown parameter", lambda: _request(_text(), parameters={"drop-first": service_pb2.InferParameter(int64_param=1)}), "unknown parameter `drop-first`"),
    ("drop_first as string", lambda: _request(_text(), parameters={"drop_first": service_pb2.InferParameter(string_param="1")}), "parameter `drop_first` must be an integer"),
    ("bad fan-out entry", lambda: _request(_text(), parameters={"tasks": service_pb2.InferParameter(string_param="topic@x")}), "entry `topic@x` has a version that is not a number"),
    ("unknown output", lambda: _request(_text(), outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="scores")]), "unknown output `scores`; this request's outputs are logits, probabilities, label"),
    ("version not a number", lambda: _request(_text(), model_version="latest"), "version `latest` is not a number"),
    ("sequence batching", lambda: _request(_text(), parameters={"sequence_id": service_pb2.InferParameter(int64_param=7)}), "sequence batching is not supported"),
]


@pytest.mark.parametrize("what,build,needle", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_invalid_argument(kserve, what, build, needle):
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelInfer(build(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {err.value.details()}"
    assert needle in err.value.details(), f"{what}: `{err.value.details()}` lacks `{needle}`"


def test_server_keeps_serving_after_malformed_requests(kserve):
    assert kserve.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready
    assert kserve.ModelInfer(_request(_text()), timeout=30).outputs[0].name == "logits"


def test_messages_over_tonics_default_limit_are_read_up_to_the_configured_limit():
    # 6 MiB of token ids: over tonic's 4 MiB default and what tritonclient may send. With
    # `server.max_message_bytes` raised to 8 MiB it must reach our own validation (a length error),
    # not die on a transport message-size limit; with the default (2 MiB) it is OUT_OF_RANGE.
    # (Ordinary token ids: all-padding input has no content and is refused.)
    from adapterdrop_tools.served import Server

    from .conftest import _ort_library, _server_binary, _test_repo

    big = np.full((1, 6 * 2**20 // 8), 1037, dtype=np.int64)
    opts = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
    for limit in (8 << 20, None):
        env = {"ORT_DYLIB_PATH": str(_ort_library())}
        if limit:
            env["ADAPTERDROP__SERVER__MAX_MESSAGE_BYTES"] = str(limit)
        with Server(_server_binary(), _test_repo(), timeout_s=120, extra_env=env) as srv, \
                grpc.insecure_channel(srv.addr, options=opts) as ch:
            kserve = service_pb2_grpc.GRPCInferenceServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                kserve.ModelInfer(_request(_ids("input_ids", big)), timeout=60)
            if limit is None:
                assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE, err.value.details()
                continue
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "tokens but the backbone accepts at most" in err.value.details()
            # ... and with truncate, the same message is answered.
            req = _request(_ids("input_ids", big), parameters={"truncate": service_pb2.InferParameter(bool_param=True)})
            assert kserve.ModelInfer(req, timeout=60).outputs[0].shape == [1, 2]
