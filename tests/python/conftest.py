"""Fixtures for the Python gRPC client tests: a real adapterdrop-serve on a real port.

The server binary must already be built (`cargo build`); the stubs are generated from
proto/ with grpc_tools at session start, so nothing generated is checked in.
"""
import importlib
import json
import os
import sys
from pathlib import Path

import grpc
import pytest

from adapterdrop_tools.served import Server, server_binary, sub_repository

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
STARTUP_TIMEOUT_S = 120


def _test_repo() -> Path:
    return Path(os.environ.get("ADAPTERDROP_TEST_REPO", ROOT / "build" / "test-repo"))


def _server_binary() -> Path:
    exe = server_binary()
    if exe is not None:
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


@pytest.fixture(scope="session")
def server():
    """The real server binary on the test repository (`served.Server`: every port ephemeral)."""
    ort = _ort_library()
    if not ort.exists():
        pytest.fail(f"ONNX Runtime library {ort} is missing; run `make setup` or set ORT_DYLIB_PATH", pytrace=False)
    try:
        srv = Server(_server_binary(), _test_repo(), timeout_s=STARTUP_TIMEOUT_S, extra_env={"ORT_DYLIB_PATH": str(ort)})
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield srv
    srv.stop(10)


BREADTH_REPO = Path(os.environ.get("ADAPTERDROP_BREADTH_REPO", ROOT / "build" / "breadth-repo"))


@pytest.fixture(scope="session")
def breadth_server(tmp_path_factory):
    """Starts a server on the breadth repository (`make breadth-repo`): the whole of it, or only
    `backbone` and `tasks` copied into a temporary repository; every server stops at the end."""
    started = []

    def start(backbone: str, tasks: tuple | None = None) -> Server:
        if not (BREADTH_REPO / "backbones" / backbone / "backbone.json").is_file():
            pytest.fail(f"{BREADTH_REPO} is missing; run `make breadth-repo` first", pytrace=False)
        repo = BREADTH_REPO if tasks is None else sub_repository(
            BREADTH_REPO, tmp_path_factory.mktemp(f"{backbone}-repo"), backbone, tasks)
        started.append(Server(_server_binary(), repo, timeout_s=120))
        return started[-1]

    yield start
    for srv in started:
        srv.stop(10)


@pytest.fixture(scope="session")
def channel(server):
    ch = grpc.insecure_channel(server.addr)
    grpc.channel_ready_future(ch).result(timeout=30)
    yield ch
    ch.close()


@pytest.fixture(scope="session")
def stub(channel, pb_grpc):
    return pb_grpc.InferenceStub(channel)
