"""Seeded protocol fuzzer for every RPC of the inference port (adapterdrop.v1.Inference, KServe v2) and
the admin port (adapterdrop.v1.Admin, RegisterTask's upload stream included).

Each case is one of: random bytes; a valid request with bytes mutated (flips, inserts, deletes,
truncation); a valid request with fields set to hostile values (extreme integers, NaN, huge or empty
repeated fields, KServe shapes like [2147483647, 0], long or odd strings, wrong datatypes, unknown
parameter keys); or a hand-made undecodable message. Every case is derived from the seed alone, so a
seed replays the same calls. The verdict: no call may end in a status that blames the server (INTERNAL,
UNKNOWN, DATA_LOSS), the server must stay up (no UNAVAILABLE) and answer in time (no DEADLINE_EXCEEDED).
"""
from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.descriptor import FieldDescriptor as FD

from . import wire

# Statuses a client error may get; anything else is a server fault (or a crash, or a hang).
CLIENT_ERROR_CODES = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.ALREADY_EXISTS,
}

INT32 = [0, 1, -1, 7, 2**31 - 1, -2**31]
INT64 = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, -2**63]
UINT32 = [0, 1, 3, 255, 2**31 - 1, 2**32 - 1]
UINT64 = [0, 1, 2**32, 2**63, 2**64 - 1]
FLOATS = [0.0, -0.0, math.nan, math.inf, -math.inf, 3.4e38, -1e-45, 1.0]
# KServe shapes (and any other repeated int64): the hostile ones the red team used, and more.
SHAPES = [[2147483647], [2147483647, 0], [16777216, 0], [0, 2147483647], [-1], [-1, 4], [0], [],
          [2**62, 4], [2**63 - 1], [1] * 64, [3, 2**31], [1, 1, 1, 1], [2, 1]]
TASK_NAMES = ["sent", "topic", "score", "rsent", "fusion", "nope", "sent@1", "sent@0", "sent@4294967295",
              "sent:2", "sent:99", "fusion-pruned@1:1"]
STRINGS = ["", "\x00", "\x00\x01\x1f", "[PAD]", "[CLS] [SEP]", "BYTES", "INT64", "FP32", "FP16", "BOOL", "INT8",
           "TEXT", "TEXT_PAIR", "input_ids", "attention_mask", "token_type_ids", "logits", "label",
           "../../etc/passwd", "/abs", "a/../../b", ".hidden", "slots/../task.json", "\u202e\U0001F3AC",
           "drop_first", "tasks", "truncate", "timeout", "priority", ",".join(TASK_NAMES), ",,,", "sent," * 200,
           *TASK_NAMES]
# Defects of issue 13 that the fuzzer finds and whose fixes are on other branches, not yet merged here.
# While an entry is listed, the run avoids it (item 13 kills the process); delete the entry when its fix
# is merged, and the fuzzer guards it from then on. (Item 20, the version overflow it also found, is
# fixed on main: registering version 4294967295 is refused.)
# FUZZ_KNOWN_OPEN="" (environment) runs with none of them.
# (Item 13, hostile KServe shapes that aborted the process, is fixed: the fuzzer sends them again.)
KNOWN_OPEN: dict[str, str] = {}
# The shapes that trigger item 13 (product over the limits, or a zero hiding a huge dimension).
CRASHING_SHAPES = [s for s in SHAPES if any(d > 1 << 20 or d < -1 for d in s) or (0 in s and len(s) > 1)]
PARAM_KEYS = ["drop_first", "tasks", "truncate", "timeout", "priority", "binary_data_output", "triton_x", "zzz", ""]


@dataclass
class Case:
    method: wire.Method
    kind: str
    payloads: list


@dataclass
class Report:
    seed: int
    calls: int = 0
    seconds: float = 0.0
    by_status: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)
    stopped_early: bool = False

    def summary(self) -> str:
        statuses = ", ".join(f"{k}={v}" for k, v in sorted(self.by_status.items()))
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.by_kind.items()))
        groups = Counter((f["method"], f["code"], re.sub(r"\d+", "N", f["details"][:100])) for f in self.failures)
        distinct = "".join(f"\n    {n}x {m} {c}: {d}" for (m, c, d), n in groups.most_common())
        return (f"fuzz seed={self.seed} calls={self.calls}{' (time budget spent)' if self.stopped_early else ''} "
                f"seconds={self.seconds:.1f} "
                f"failures={len(self.failures)}\n  by status: {statuses}\n  by kind: {kinds}"
                + (f"\n  distinct failures:{distinct}" if distinct else ""))


def valid_corpus(bundle_dir: Path) -> dict[str, list[list[bytes]]]:
    """Valid requests (as message lists) per method path, the seeds of every mutation."""
    M = wire.message
    infer = M("adapterdrop.v1.InferRequest")
    texts = infer(tasks=[{"name": "sent"}, {"name": "topic", "drop_first": 1}], texts={"texts": ["a gripping film", "dull"]})
    pairs = infer(tasks=[{"name": "sent", "version": 1}], pairs={"pairs": [{"text": "a man plays", "text_pair": "music"}]})
    ids = infer(tasks=[{"name": "rsent"}], tokens={"sequences": [{"input_ids": [0, 17, 250, 2], "attention_mask": [1, 1, 1, 1]}]})
    fusion = infer(tasks=[{"name": "fusion", "drop_first": 1}], texts={"texts": ["short"]}, return_fusion_weights=True, truncate=True)
    mi = M("inference.ModelInferRequest")
    text_raw = mi(model_name="sent", inputs=[{"name": "TEXT", "datatype": "BYTES", "shape": [2]}],
                  raw_input_contents=[len(b"a film").to_bytes(4, "little") + b"a film" + (4).to_bytes(4, "little") + b"dull"])
    text_typed = mi(model_name="topic", model_version="1",
                    inputs=[{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "contents": {"bytes_contents": [b"news"]}}],
                    parameters={"drop_first": {"int64_param": 1}, "tasks": {"string_param": "sent,score"}})
    ids_typed = mi(model_name="rsent", inputs=[
        {"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "contents": {"int64_contents": [0, 5, 2]}},
        {"name": "attention_mask", "datatype": "INT64", "shape": [1, 3], "contents": {"int64_contents": [1, 1, 1]}}],
        outputs=[{"name": "logits"}])
    upload = [M("adapterdrop.v1.RegisterTaskRequest")(header={"name": "fz-task"}).SerializeToString()]
    for f in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
        upload.append(M("adapterdrop.v1.RegisterTaskRequest")(
            chunk={"path": f.relative_to(bundle_dir).as_posix(), "data": f.read_bytes()}).SerializeToString())
    s = lambda *msgs: [m.SerializeToString() for m in msgs]  # noqa: E731
    return {
        "/adapterdrop.v1.Inference/Infer": [s(texts), s(pairs), s(ids), s(fusion)],
        "/adapterdrop.v1.Inference/InferStream": [s(texts, ids), s(fusion)],
        "/adapterdrop.v1.Inference/ListTasks": [[b""]],
        "/adapterdrop.v1.Inference/GetTask": [s(M("adapterdrop.v1.GetTaskRequest")(name="sent", version=1))],
        "/inference.GRPCInferenceService/ServerLive": [[b""]],
        "/inference.GRPCInferenceService/ServerReady": [[b""]],
        "/inference.GRPCInferenceService/ModelReady": [s(M("inference.ModelReadyRequest")(name="sent", version="1"))],
        "/inference.GRPCInferenceService/ServerMetadata": [[b""]],
        "/inference.GRPCInferenceService/ModelMetadata": [s(M("inference.ModelMetadataRequest")(name="topic"))],
        "/inference.GRPCInferenceService/ModelInfer": [s(text_raw), s(text_typed), s(ids_typed)],
        "/inference.GRPCInferenceService/ModelStreamInfer": [s(text_raw, ids_typed)],
        "/inference.GRPCInferenceService/ModelConfig": [s(M("inference.ModelConfigRequest")(name="sent"))],
        "/inference.GRPCInferenceService/ModelStatistics": [s(M("inference.ModelStatisticsRequest")(name="sent"))],
        "/inference.GRPCInferenceService/RepositoryIndex": [s(M("inference.RepositoryIndexRequest")(ready=True))],
        "/inference.GRPCInferenceService/RepositoryModelLoad": [s(M("inference.RepositoryModelLoadRequest")(model_name="sent"))],
        "/inference.GRPCInferenceService/RepositoryModelUnload": [s(M("inference.RepositoryModelUnloadRequest")(model_name="sent"))],
        "/adapterdrop.v1.Admin/RegisterTask": [upload],
        "/adapterdrop.v1.Admin/UnregisterTask": [s(M("adapterdrop.v1.UnregisterTaskRequest")(name="fz-task", all_versions=True))],
        "/adapterdrop.v1.Admin/SetDefaultVersion": [s(M("adapterdrop.v1.SetDefaultVersionRequest")(name="fz-task", version=1))],
        "/adapterdrop.v1.Admin/ListTasks": [[b""]],
        "/adapterdrop.v1.Admin/GetTask": [s(M("adapterdrop.v1.GetTaskRequest")(name="sent"))],
    }


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:
            i = rng.randint(0, len(b))
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and b:
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 8)]
        elif op == 4 and b:
            del b[rng.randrange(len(b)):]
        elif op == 5 and b:
            i = rng.randrange(len(b))
            b[i:i] = b[i:i + rng.randint(1, 16)] * rng.randint(1, 4)
    return bytes(b)


def hostile_scalar(f, rng: random.Random):
    t = f.type
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return rng.choice(INT32)
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return rng.choice(INT64)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return rng.choice(UINT32)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return rng.choice(UINT64)
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return rng.choice(FLOATS)
    if t == FD.TYPE_BOOL:
        return rng.random() < 0.5
    if t == FD.TYPE_ENUM:
        return rng.choice([0, 1, 2, 99, -1, 2**31 - 1])
    if t == FD.TYPE_STRING:
        r = rng.random()
        if r < 0.1:
            return "x" * rng.choice([300, 5000, 70000])
        if r < 0.2:
            return " ".join(rng.choice(["good", "film", "[PAD]", "\x00", "é", "🎬"]) for _ in range(rng.randint(1, 600)))
        return rng.choice(STRINGS)
    if t == FD.TYPE_BYTES:
        return rng.choice([b"", b"\x00", b"\xff\xfe", b"\x00" * 4096, rng.randbytes(rng.randint(1, 64)),
                           (2**31 - 1).to_bytes(4, "little") + b"ab", (5).to_bytes(4, "little") + b"\xc3\x28xyz"])
    raise ValueError(t)


def _fields(msg, depth=0, out=None):
    """(message, field) pairs reachable through set fields, for structured mutation."""
    out = [] if out is None else out
    for f in msg.DESCRIPTOR.fields:
        out.append((msg, f))
        if f.type != FD.TYPE_MESSAGE or depth >= 4:
            continue
        value = getattr(msg, f.name)
        if f.message_type.GetOptions().map_entry:
            if f.message_type.fields_by_name["value"].type == FD.TYPE_MESSAGE:
                for v in value.values():
                    _fields(v, depth + 1, out)
        elif f.is_repeated:
            for sub in value:
                _fields(sub, depth + 1, out)
        elif msg.HasField(f.name):
            _fields(value, depth + 1, out)
    return out


def mutate_field(msg, f, rng: random.Random) -> None:
    value = getattr(msg, f.name)
    if f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
        key = rng.choice(PARAM_KEYS)
        vf = f.message_type.fields_by_name["value"]
        if vf.type == FD.TYPE_MESSAGE:
            entry = value[key]
            sub = rng.choice(entry.DESCRIPTOR.fields)
            if sub.type != FD.TYPE_MESSAGE:
                setattr(entry, sub.name, hostile_scalar(sub, rng))
        else:
            value[key] = hostile_scalar(vf, rng)
        return
    if f.is_repeated:
        if f.type == FD.TYPE_MESSAGE:
            items = list(value)
            del value[:]
            if items and rng.random() < 0.7:
                n = rng.choice([2, 10, 300, 2000])
                for i in range(n):
                    value.add().CopyFrom(items[i % len(items)])
            elif rng.random() < 0.5:
                value.add()
            return
        del value[:]
        if f.type in (FD.TYPE_INT64, FD.TYPE_SINT64) and rng.random() < 0.6:
            value.extend(rng.choice(SHAPES))
        else:
            value.extend(hostile_scalar(f, rng) for _ in range(rng.choice([0, 1, 3, 300, 5000])))
        return
    if f.type == FD.TYPE_MESSAGE:
        if rng.random() < 0.5:
            msg.ClearField(f.name)
        else:
            getattr(msg, f.name).SetInParent()
        return
    setattr(msg, f.name, hostile_scalar(f, rng))


def hostile_tensor(cls, data: bytes, rng: random.Random) -> bytes:
    """A valid KServe ModelInferRequest whose first input gets a hostile shape and contents that may
    not match it (none, one empty raw buffer, an empty typed list, a few bytes): what the red team's
    42-byte crash was made of."""
    msg = cls.FromString(data)
    t = msg.inputs[0]
    del t.shape[:]
    t.shape.extend(rng.choice(SHAPES))
    if rng.random() < 0.3:
        t.datatype = rng.choice(["BYTES", "INT64", "FP32", "INT32", "BOOL", ""])
    choice = rng.randrange(4)
    t.ClearField("contents")
    del msg.raw_input_contents[:]
    if choice == 1:
        msg.raw_input_contents.extend([b""] * len(msg.inputs))
    elif choice == 2:
        t.contents.SetInParent()
    elif choice == 3:
        msg.raw_input_contents.extend([rng.randbytes(rng.choice([0, 4, 8, 12]))] * len(msg.inputs))
    return msg.SerializeToString()


def mutate_structured(cls, data: bytes, rng: random.Random) -> bytes | None:
    msg = cls.FromString(data)
    for _ in range(rng.randint(1, 3)):
        fields = _fields(msg)
        if not fields:
            return None
        parent, f = rng.choice(fields)
        try:
            mutate_field(parent, f, rng)
        except (ValueError, TypeError):
            continue
    try:
        return msg.SerializeToString()
    except (ValueError, UnicodeEncodeError):
        return None


ADMIN_WRITES = ("RegisterTask", "UnregisterTask", "SetDefaultVersion")


def fence(cls, payload: bytes) -> bytes:
    """Admin calls that change the repository may only name `fz-*` tasks: the fixed valid requests
    checked after the run need theirs. A payload that does not decode here is left alone (the server
    refuses it too); one that names another task gets the name prefixed."""
    try:
        msg = cls.FromString(payload)
    except Exception:  # noqa: BLE001 (any decode failure: the server sees the same bytes)
        return payload
    target = msg.header if cls.DESCRIPTOR.name == "RegisterTaskRequest" and msg.HasField("header") else msg
    if "name" not in target.DESCRIPTOR.fields_by_name or target.name.startswith("fz"):
        return payload
    target.name = "fz-" + target.name
    return msg.SerializeToString()


class Fuzzer:
    def __init__(self, seed: int, bundle_dir: Path, known_open=tuple(KNOWN_OPEN)):
        self.seed = seed
        self.known_open = set(known_open)
        unknown = self.known_open - set(KNOWN_OPEN)
        assert not unknown, f"unknown known-open defects {unknown}; choose from {sorted(KNOWN_OPEN)}"
        self.rng = random.Random(seed)
        self.methods = [m for services in wire.PORT_SERVICES.values() for s in services for m in wire.methods(s)]
        self.port_of = {m.path: port for port, services in wire.PORT_SERVICES.items() for s in services
                        for m in wire.methods(s)}
        self.corpus = valid_corpus(bundle_dir)
        missing = {m.path for m in self.methods} - set(self.corpus)
        assert not missing, f"no valid request for {missing}"
        self.registrations = 0

    def case(self) -> Case:
        rng = self.rng
        method = rng.choice(self.methods)
        cls = wire.message(method.input.full_name)
        seeds = rng.choice(self.corpus[method.path])
        r = rng.random()
        if method.name == "RegisterTask":
            # Uploads cost a validation and a trial run: keep whole valid bundles rare, fuzz the header often.
            seeds = list(seeds)
            header = {"name": f"fz-{rng.randrange(4)}", "set_default": rng.random() < 0.3, "replace": rng.random() < 0.3}
            version = rng.choice([None, 1, 2, 2**32 - 1])
            if version is not None:
                header["version"] = version
            seeds[0] = wire.message("adapterdrop.v1.RegisterTaskRequest")(header=header).SerializeToString()
        if r < 0.15:
            kind = "random bytes"
            payloads = [rng.randbytes(rng.randint(0, 256)) for _ in range(rng.randint(1, 3) if method.client_streaming else 1)]
        elif r < 0.25:
            kind = "undecodable"
            bad = wire.undecodable(method.input)
            payloads = [*seeds[:-1], bad[rng.choice(sorted(bad))]] if method.client_streaming else [bad[rng.choice(sorted(bad))]]
        elif r < 0.55:
            kind = "mutated bytes"
            i = rng.randrange(len(seeds))
            payloads = [*seeds[:i], mutate_bytes(seeds[i], rng), *seeds[i + 1:]]
        elif (r < 0.95 and method.input.full_name == "inference.ModelInferRequest" and rng.random() < 0.4
              and "item13" not in self.known_open):
            kind = "hostile tensor"
            payloads = [hostile_tensor(cls, p, rng) for p in seeds]
        elif r < 0.95:
            kind = "structured"
            i = rng.randrange(len(seeds))
            mutated = mutate_structured(cls, seeds[i], rng)
            if mutated is not None and "item13" in self.known_open and method.input.full_name == "inference.ModelInferRequest":
                t = cls.FromString(mutated)
                if any(list(x.shape) in CRASHING_SHAPES for x in t.inputs):
                    mutated = None
            payloads = [*seeds[:i], mutated if mutated is not None else seeds[i], *seeds[i + 1:]]
        else:
            kind = "valid"
            payloads = list(seeds)
        if method.name == "RegisterTask" and kind in ("valid", "structured"):
            self.registrations += 1
        if method.service == wire.ADMIN and method.name in ADMIN_WRITES:
            payloads = [fence(cls, p) for p in payloads]
        return Case(method, kind, payloads)

    def run(self, channels: dict, calls: int, timeout_s: float, metadata, alive, budget_s: float = math.inf) -> Report:
        """`calls` cases, or fewer when `budget_s` seconds are spent (`Report.stopped_early`); `alive()`
        says whether the server process still runs (checked after any status that could mean it died)."""
        report = Report(self.seed)
        start = time.monotonic()
        for i in range(calls):
            if time.monotonic() - start > budget_s:
                report.stopped_early = True
                break
            c = self.case()
            port = self.port_of[c.method.path]
            t0 = time.monotonic()
            code, details, _ = wire.call(channels[port], c.method, c.payloads, timeout_s,
                                         metadata if port == "admin" else None)
            report.calls += 1
            report.by_status[code.name] += 1
            report.by_kind[c.kind] += 1
            if code not in CLIENT_ERROR_CODES:
                report.failures.append({"call": i, "method": c.method.path, "kind": c.kind, "code": code.name,
                                        "details": details[:300], "seconds": round(time.monotonic() - t0, 2),
                                        "payload_hex": [p[:64].hex() for p in c.payloads]})
                if not alive():
                    report.failures[-1]["details"] += " [server process died]"
                    break
        report.seconds = time.monotonic() - start
        return report
