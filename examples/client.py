#!/usr/bin/env python3
"""Minimal grpcio client for adapterdrop-serve.

    python examples/client.py --addr localhost:50051 --task sent "a great film" "a dull plot"
    python examples/client.py --addr localhost:50051 --task sent --drop-first 1 "a great film"
    python examples/client.py --addr localhost:50051 --list

Needs grpcio and grpcio-tools. Stubs are generated from proto/ into a temp dir on every
run, unless --stubs names a folder that already holds adapterdrop/v1/adapterdrop_pb2*.py.
"""
import argparse
import importlib
import sys
import tempfile
from pathlib import Path

import grpc

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILE = "adapterdrop/v1/adapterdrop.proto"


def load_stubs(stub_dir=None):
    """Returns (adapterdrop_pb2, adapterdrop_pb2_grpc)."""
    if stub_dir is None:
        from grpc_tools import protoc

        stub_dir = tempfile.mkdtemp(prefix="adapterdrop-stubs-")
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={stub_dir}", f"--grpc_python_out={stub_dir}", PROTO_FILE]
        if protoc.main(args) != 0:
            sys.exit(f"error: protoc failed on {PROTO_ROOT / PROTO_FILE}")
        for pkg in ("adapterdrop", "adapterdrop/v1"):
            (Path(stub_dir) / pkg / "__init__.py").touch()
    sys.path.insert(0, str(stub_dir))
    importlib.invalidate_caches()
    return (importlib.import_module("adapterdrop.v1.adapterdrop_pb2"),
            importlib.import_module("adapterdrop.v1.adapterdrop_pb2_grpc"))


def drop_text(pb, info):
    mode = info.drop.WhichOneof("mode")
    if mode == "robust":
        r = info.drop.robust
        return f"robust default={r.default} range={r.min}..{r.max}"
    if mode == "drop_first":
        return f"drop_first={info.drop.drop_first}"
    if mode == "layers":
        return "layers=" + ",".join(map(str, info.drop.layers.layers))
    return "none"


def list_tasks(pb, stub, timeout):
    resp = stub.ListTasks(pb.ListTasksRequest(), timeout=timeout)
    for t in resp.tasks:
        status = pb.TaskStatus.Name(t.status).removeprefix("TASK_STATUS_")
        labels = ",".join(t.labels) or "-"
        print(f"{t.name} v{t.version} [{status}] backbone={t.backbone} head={t.head_type} "
              f"drop=({drop_text(pb, t)}) labels={labels}")
        if t.status_reason:
            print(f"    reason: {t.status_reason}")


def infer(pb, stub, args):
    ref = pb.TaskRef(name=args.task)
    if args.drop_first is not None:
        ref.drop_first = args.drop_first
    req = pb.InferRequest(tasks=[ref], texts=pb.Texts(texts=args.texts), truncate=args.truncate)
    resp = stub.Infer(req, timeout=args.timeout)
    for result in resp.results:
        dropped = ",".join(map(str, result.dropped_layers)) or "none"
        print(f"task {result.task} v{result.version}, dropped layers: {dropped}")
        for text, seq in zip(args.texts, result.sequences):
            print(f"{text!r}")
            if seq.label:
                scores = " ".join(f"{s:.4f}" for s in seq.scores)
                print(f"  label={seq.label} scores=[{scores}]")
            else:
                print(f"  value={' '.join(f'{x:.4f}' for x in seq.logits)}")
    print(f"total {resp.timings.total_us / 1000:.1f} ms")


def main(argv=None):
    p = argparse.ArgumentParser(description="adapterdrop-serve gRPC client")
    p.add_argument("--addr", default="localhost:50051", help="host:port of the server")
    p.add_argument("--list", action="store_true", help="list the server's tasks and exit")
    p.add_argument("--task", help="task to run")
    p.add_argument("--drop-first", type=int, help="drop adapters of the first N layers (robust tasks)")
    p.add_argument("--truncate", action="store_true", help="cut inputs longer than the backbone allows")
    p.add_argument("--stubs", help="folder with pre-generated stubs (default: generate into a temp dir)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-call deadline in seconds")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    args = p.parse_args(argv)
    if not args.list and (not args.task or not args.texts):
        p.error("give --list, or --task NAME and at least one TEXT")

    pb, pb_grpc = load_stubs(args.stubs)
    with grpc.insecure_channel(args.addr) as channel:
        stub = pb_grpc.InferenceStub(channel)
        try:
            if args.list:
                list_tasks(pb, stub, args.timeout)
            else:
                infer(pb, stub, args)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
