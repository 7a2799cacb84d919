"""Fixtures for the Python gRPC client tests: a real adapterdrop-serve on a real port.

The server binary must already be built (`cargo build`); the stubs are generated from
proto/ with grpc_tools at session start, so nothing generated is checked in.
"""
import importlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
STARTUP_TIMEOUT_S = 120


def _test_repo() -> Path:
    return Path(os.environ.get("ADAPTERDROP_TEST_REPO", ROOT / "build" / "test-repo"))


def _server_binary() -> Path:
    for profile in ("debug", "release"):
        exe = ROOT / "target" / profile / "adapterdrop-serve"
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    pytest.fail(
        "adapterdrop-serve binary not found in target/debug or target/release; "
        "run `cargo build` first",
        pytrace=False,
    )


def _ort_library() -> Path:
    return Path(os.environ.get("ORT_DYLIB_PATH", ROOT / "build" / "lib" / "libonnxruntime.so"))


@pytest.fixture(scope="session")
def expected():
    path = _test_repo() / "expected.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing; run `make test-repo` first", pytrace=False)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def stub_dir(tmp_path_factory):
    """Generates adapterdrop.v1 stubs into a temp dir and puts it on sys.path."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    proto = "adapterdrop/v1/adapterdrop.proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--grpc_python_out={out}", proto]
    if protoc.main(args) != 0:
        pytest.fail(f"grpc_tools.protoc failed on {proto}", pytrace=False)
    for pkg in (out / "adapterdrop", out / "adapterdrop" / "v1"):
        (pkg / "__init__.py").touch()
    sys.path.insert(0, str(out))
    importlib.invalidate_caches()
    return out


@pytest.fixture(scope="session")
def pb(stub_dir):
    return importlib.import_module("adapterdrop.v1.adapterdrop_pb2")


@pytest.fixture(scope="session")
def pb_grpc(stub_dir):
    return importlib.import_module("adapterdrop.v1.adapterdrop_pb2_grpc")


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, addr: str, logs: list, metrics_addr: "str | None" = None):
        self.proc = proc
        self.addr = addr
        self.logs = logs
        self.metrics_addr = metrics_addr

    def log_text(self) -> str:
        return "".join(self.logs)


@pytest.fixture(scope="session")
def server():
    exe = _server_binary()
    repo = _test_repo()
    ort = _ort_library()
    if not ort.exists():
        pytest.fail(f"ONNX Runtime library {ort} is missing; run `make setup` or set ORT_DYLIB_PATH", pytrace=False)
    env = dict(os.environ)
    env.update(
        {
            "ADAPTERDROP__SERVER__LISTEN": "127.0.0.1:0",
            "ADAPTERDROP__METRICS__LISTEN": "127.0.0.1:0",
            "ADAPTERDROP__ADMIN__LISTEN": "127.0.0.1:0",
            "ADAPTERDROP__REPOSITORY__PATH": str(repo),
            "ORT_DYLIB_PATH": str(ort),
            "ADAPTERDROP__LOG__FORMAT": "text",
            "NO_COLOR": "1",
        }
    )
    proc = subprocess.Popen(
        [str(exe)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    logs: list = []
    lines: "queue.Queue[str | None]" = queue.Queue()

    def pump():
        for line in proc.stdout:
            logs.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()

    addr = None
    metrics_addr = None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while addr is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            break
        if "metrics_addr=" in line:
            metrics_addr = line.split("metrics_addr=", 1)[1].split()[0]
        elif "listening" in line and "addr=" in line:
            addr = line.split("addr=", 1)[1].split()[0]
    if addr is None:
        proc.kill()
        proc.wait()
        pytest.fail(
            f"adapterdrop-serve did not report `listening` within {STARTUP_TIMEOUT_S}s "
            f"(exit code {proc.returncode}); log:\n{''.join(logs)}",
            pytrace=False,
        )

    yield ServerProcess(proc, addr, logs, metrics_addr)

    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def channel(server):
    ch = grpc.insecure_channel(server.addr)
    grpc.channel_ready_future(ch).result(timeout=30)
    yield ch
    ch.close()


@pytest.fixture(scope="session")
def stub(channel, pb_grpc):
    return pb_grpc.InferenceStub(channel)
