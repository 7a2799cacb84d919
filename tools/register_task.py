#!/usr/bin/env python3
"""Register, list, pin and remove tasks of a running adapterdrop-serve through its admin port.

Usage:
  register_task.py --addr HOST:50052 register --name TASK (--dir TASK_VERSION_DIR |
                   --adapter DIR --repo REPO --backbone NAME (--drop-first n | --drop-layers 0,2 | --robust d,min,max)
                   [--head DIR] [--checkpoint DIR]) [--version N] [--set-default] [--replace]
  register_task.py --addr HOST:50052 register --name TASK --weights-only --adapter DIR [--head DIR] [--stack DIR]
                   --backbone NAME (--drop-first n | --drop-layers 0,2 | --robust d,min,max) [--max-answer-length N]
                   [--version N] [--set-default] [--replace]
  register_task.py --addr HOST:50052 unregister --name TASK (--version N | --all)
  register_task.py --addr HOST:50052 set-default --name TASK [--version N]   (no --version: remove the pin)
  register_task.py --addr HOST:50052 list

--dir uploads an exported task version directory (task.json + the graphs it names). --adapter converts
an AdapterHub adapter directory client-side first (tools/export_task.py, into a temporary directory;
the backbone must be in the local --repo: its manifest and LayerNorm weights are read from there), then
uploads the result. --weights-only uploads the AdapterHub files themselves (adapter_config.json,
adapter.safetensors, head_config.json, model_head.safetensors; no local repository needed): the server
validates them and loads them into its adapter banks (issue 12). With --stack DIR (a language adapter, e.g.
with its invertible adapter) the task runs as the library's Stack(<DIR's adapter>, <--adapter's adapter>)
(MAD-X): DIR's adapter_config.json and adapter.safetensors are uploaded under stack/. The token is --token or $ADAPTERDROP_ADMIN_TOKEN (sent as `authorization: Bearer`).
Errors print `error: <gRPC code>: <message>` and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = Path(__file__).resolve().parents[1]
CHUNK_BYTES = 1 << 20


def stubs():
    """Generates the adapterdrop.v1 Python stubs from proto/ (grpcio-tools) once per process."""
    if "adapterdrop.v1.admin_pb2" in sys.modules:
        return sys.modules["adapterdrop.v1.admin_pb2"], sys.modules["adapterdrop.v1.admin_pb2_grpc"]
    from grpc_tools import protoc

    loaded = sys.modules.get("adapterdrop.v1")
    if loaded is not None:  # stubs of adapterdrop.proto already imported (e.g. by a test): add admin's there
        out = Path(list(loaded.__path__)[0]).parents[1]
        protos = ["adapterdrop/v1/admin.proto"]
    else:
        out = Path(tempfile.mkdtemp(prefix="adapterdrop-stubs-"))
        protos = ["adapterdrop/v1/adapterdrop.proto", "adapterdrop/v1/admin.proto"]
    if protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}", *protos]) != 0:
        raise RuntimeError("grpc_tools.protoc failed on proto/adapterdrop/v1")
    for pkg in (out / "adapterdrop", out / "adapterdrop" / "v1"):
        (pkg / "__init__.py").touch()
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    importlib.invalidate_caches()
    return importlib.import_module("adapterdrop.v1.admin_pb2"), importlib.import_module("adapterdrop.v1.admin_pb2_grpc")


def bundle_files(task_dir: str) -> list:
    """Relative '/'-separated paths of every file of a task version directory, sorted."""
    base = Path(task_dir)
    if not (base / "task.json").is_file():
        raise SystemExit(f"error: {task_dir} has no task.json (not a task version directory)")
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())


def upload_messages(pb, task_dir: str, name: str, version=None, set_default=False, replace=False, chunk=CHUNK_BYTES,
                    adapterhub=None, files=None):
    """The RegisterTask stream: a header, then every file of `task_dir` (or `files`: [(path, local file)])."""
    header = pb.BundleHeader(name=name, set_default=set_default, replace=replace)
    if version is not None:
        header.version = int(version)
    if adapterhub is not None:
        header.adapterhub.CopyFrom(adapterhub)
    yield pb.RegisterTaskRequest(header=header)
    if files is None:
        files = [(rel, Path(task_dir) / rel) for rel in bundle_files(task_dir)]
    for rel, path in files:
        data = Path(path).read_bytes()
        for i in range(0, max(len(data), 1), chunk):
            yield pb.RegisterTaskRequest(chunk=pb.BundleChunk(path=rel, data=data[i:i + chunk]))


ADAPTER_FILES = ("adapter_config.json", "adapter.safetensors")
HEAD_FILES = ("head_config.json", "model_head.safetensors")


def weights_only(pb, core, a):
    """(AdapterHubTask header part, files) of a weights-only registration of a.adapter (+ a.head)."""
    drop = core.DropConfig()
    if a.drop_first is not None:
        drop.drop_first = a.drop_first
    elif a.drop_layers is not None:
        drop.layers.layers.extend(int(x) for x in a.drop_layers.split(",") if x.strip())
    elif a.robust is not None:
        default, lo, hi = (int(x) for x in a.robust.split(","))
        drop.robust.CopyFrom(core.RobustRange(default=default, min=lo, max=hi))
    else:
        raise SystemExit("error: --weights-only needs one of --drop-first, --drop-layers, --robust")
    files = [(f, Path(a.adapter) / f) for f in ADAPTER_FILES] + [(f, Path(a.head or a.adapter) / f) for f in HEAD_FILES]
    if getattr(a, "stack", None):
        files += [(f"stack/{f}", Path(a.stack) / f) for f in ADAPTER_FILES]
    missing = [str(p) for _, p in files if not p.is_file()]
    if missing:
        raise SystemExit(f"error: missing AdapterHub files (safetensors only): {', '.join(missing)}")
    hub = pb.AdapterHubTask(backbone=a.backbone, drop=drop, description=a.description or "")
    if getattr(a, "stack", None):
        names = [json.loads((Path(d) / "adapter_config.json").read_text())["name"] for d in (a.stack, a.adapter)]
        hub.composition = f"Stack({names[0]}, {names[1]})"
    if a.threshold is not None:
        hub.threshold = a.threshold
    if a.max_answer_length is not None:
        hub.max_answer_length = a.max_answer_length
    return hub, files


def export_adapter(a, out_dir: str) -> str:
    """Converts an AdapterHub adapter with tools/export_task.py into `out_dir`; returns the version dir."""
    import export_task  # tools/export_task.py

    repo = os.path.join(out_dir, "repo")
    os.makedirs(repo)
    # The exporter reads the backbone from <repo>/backbones and writes <repo>/tasks: link the
    # user's backbones in, so nothing is written into their repository.
    os.symlink(os.path.abspath(os.path.join(a.repo, "backbones")), os.path.join(repo, "backbones"))
    args = argparse.Namespace(repo=repo, backbone=a.backbone, adapter=a.adapter, head=a.head, checkpoint=a.checkpoint,
                              name=a.name, version=1, drop_first=a.drop_first, drop_layers=a.drop_layers,
                              robust=a.robust, description=a.description, force=False, with_up=False,
                              threshold=a.threshold)
    return export_task.export(args)


def metadata(token: str | None):
    return [("authorization", f"Bearer {token}")] if token else []


def register(stub, pb, task_dir: str, name: str, token=None, **kw):
    return stub.RegisterTask(upload_messages(pb, task_dir, name, **kw), metadata=metadata(token))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", default="localhost:50052", help="admin port (config admin.listen)")
    p.add_argument("--token", default=os.environ.get("ADAPTERDROP_ADMIN_TOKEN"), help="auth.admin_token")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("register")
    r.add_argument("--name", required=True)
    r.add_argument("--version", type=int)
    r.add_argument("--set-default", action="store_true")
    r.add_argument("--replace", action="store_true")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--dir", help="exported task version directory")
    src.add_argument("--adapter", help="AdapterHub adapter directory (converted here first, unless --weights-only)")
    r.add_argument("--weights-only", action="store_true",
                   help="upload the AdapterHub files themselves; the server validates and serves them")
    r.add_argument("--repo", help="local repository holding --backbone (with --adapter)")
    r.add_argument("--backbone")
    r.add_argument("--head")
    r.add_argument("--stack", help="with --weights-only: the lower adapter of Stack(lower, --adapter) (MAD-X)")
    r.add_argument("--checkpoint")
    r.add_argument("--description")
    r.add_argument("--threshold", type=float, help="multi-label heads: score above which a label is predicted (default 0.5)")
    r.add_argument("--drop-first", type=int)
    r.add_argument("--drop-layers")
    r.add_argument("--robust")
    r.add_argument("--max-answer-length", type=int,
                   help="with --weights-only, extractive QA heads: the longest answer in tokens a request gets by default")
    u = sub.add_parser("unregister")
    u.add_argument("--name", required=True)
    g = u.add_mutually_exclusive_group(required=True)
    g.add_argument("--version", type=int)
    g.add_argument("--all", action="store_true")
    d = sub.add_parser("set-default")
    d.add_argument("--name", required=True)
    d.add_argument("--version", type=int)
    sub.add_parser("list")
    a = p.parse_args(argv)

    import grpc

    pb, pb_grpc = stubs()
    from adapterdrop.v1 import adapterdrop_pb2 as core

    stub = pb_grpc.AdminStub(grpc.insecure_channel(a.addr, options=[("grpc.max_receive_message_length", 64 << 20)]))
    md = metadata(a.token)
    try:
        if a.cmd == "register":
            with tempfile.TemporaryDirectory(prefix="adapterdrop-export-") as tmp:
                task_dir = a.dir
                if a.weights_only:
                    if not (a.adapter and a.backbone):
                        p.error("--weights-only needs --adapter and --backbone")
                    hub, files = weights_only(pb, core, a)
                    resp = stub.RegisterTask(upload_messages(pb, "", a.name, version=a.version, set_default=a.set_default,
                                                             replace=a.replace, adapterhub=hub, files=files), metadata=md)
                elif a.adapter:
                    if not (a.repo and a.backbone):
                        p.error("--adapter needs --repo and --backbone")
                    task_dir = export_adapter(a, tmp)
                if not a.weights_only:
                    resp = register(stub, pb, task_dir, a.name, a.token, version=a.version, set_default=a.set_default,
                                    replace=a.replace)
            t = resp.task
            print(f"registered {t.name}@{t.version} ({resp.files_received} files, {resp.bytes_received} bytes, "
                  f"validated in {resp.validate_ms} ms){' default' if t.is_default_version else ''}")
        elif a.cmd == "unregister":
            req = pb.UnregisterTaskRequest(name=a.name, all_versions=a.all)
            if a.version is not None:
                req.version = a.version
            for t in stub.UnregisterTask(req, metadata=md).removed:
                print(f"removed {t.name}@{t.version} ({core.TaskStatus.Name(t.status)})")
        elif a.cmd == "set-default":
            req = pb.SetDefaultVersionRequest(name=a.name)
            if a.version is not None:
                req.version = a.version
            t = stub.SetDefaultVersion(req, metadata=md)
            print(f"{t.name}: default version {t.version}{' (pinned)' if t.default_pinned else ''}")
        else:
            for t in stub.ListTasks(core.ListTasksRequest(), metadata=md).tasks:
                flags = (" default" if t.is_default_version else "") + (" pinned" if t.default_pinned else "")
                reason = f": {t.status_reason}" if t.status_reason else ""
                print(f"{t.name}@{t.version} {core.TaskStatus.Name(t.status)}{flags}{reason}")
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
