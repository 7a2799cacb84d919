"""Start a real adapterdrop-serve on a repository and query it over gRPC (for `make eval` and tests)."""
from __future__ import annotations

import importlib
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PROTO = "adapterdrop/v1/adapterdrop.proto"


def server_binary() -> Path | None:
    """The built server (target/debug, else target/release), or None when neither is built."""
    for profile in ("debug", "release"):
        exe = ROOT / "target" / profile / "adapterdrop-serve"
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    return None


def sub_repository(src: Path, dst: Path, backbone: str, tasks: tuple = ()) -> Path:
    """A repository at `dst` holding only `backbone` and `tasks` of the repository `src` (copied)."""
    import shutil

    shutil.copytree(src / "backbones" / backbone, dst / "backbones" / backbone)
    for t in tasks:
        shutil.copytree(src / "tasks" / t, dst / "tasks" / t)
    return dst


def load_stubs():
    """(adapterdrop_pb2, adapterdrop_pb2_grpc), generated from proto/ into a temp dir."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="adapterdrop-stubs-")
    if protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}", PROTO]) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {PROTO}")
    for pkg in ("adapterdrop", "adapterdrop/v1"):
        (Path(out) / pkg / "__init__.py").touch()
    sys.path.insert(0, out)
    importlib.invalidate_caches()
    return (importlib.import_module("adapterdrop.v1.adapterdrop_pb2"),
            importlib.import_module("adapterdrop.v1.adapterdrop_pb2_grpc"))


class Server:
    """The server binary on 127.0.0.1:0 serving `repo`; `addr` (and `metrics_addr`) are read from its
    log lines. Used by `make eval` and by every Python test that starts a server."""

    def __init__(self, binary: str, repo: str, timeout_s: float = 180, extra_env: dict | None = None, args: tuple = ()):
        ort = os.environ.get("ORT_DYLIB_PATH", str(ROOT / "build" / "lib" / "libonnxruntime.so"))
        # every port ephemeral: fixed metrics/admin ports collide with other servers on the machine
        env = {**os.environ, "ADAPTERDROP__SERVER__LISTEN": "127.0.0.1:0", "ADAPTERDROP__METRICS__LISTEN": "127.0.0.1:0",
               "ADAPTERDROP__ADMIN__LISTEN": "127.0.0.1:0", "ADAPTERDROP__REPOSITORY__PATH": str(repo),
               "ORT_DYLIB_PATH": ort, "ADAPTERDROP__LOG__FORMAT": "text", "NO_COLOR": "1", **(extra_env or {})}
        self.proc = subprocess.Popen([str(binary), *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, encoding="utf-8", errors="replace")
        self.logs: list = []
        self._lines = lines = queue.Queue()
        self._admin_addr = None

        def pump():
            for line in self.proc.stdout:
                self.logs.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        self.addr = self.metrics_addr = None
        deadline = time.monotonic() + timeout_s
        while self.addr is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self._note(line)
        if self.addr is None:
            self.stop()
            raise RuntimeError(f"{binary} did not report `listening` within {timeout_s}s; log:\n{''.join(self.logs)}")

    def _note(self, line: str) -> None:
        if "metrics_addr=" in line:
            self.metrics_addr = line.split("metrics_addr=", 1)[1].split()[0]
        elif "admin service up admin=" in line:
            self._admin_addr = line.split("admin service up admin=", 1)[1].split()[0]
        elif "listening" in line and "addr=" in line and self.addr is None:
            self.addr = line.split("addr=", 1)[1].split()[0]

    def admin_addr(self, timeout_s: float = 30) -> str:
        """`host:port` of the admin port (logged right after `listening`); raises with the log if it
        never comes (admin.listen set to "" disables the port)."""
        deadline = time.monotonic() + timeout_s
        while self._admin_addr is None and time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            self._note(line)
        if self._admin_addr is None:
            raise RuntimeError(f"the server did not report `admin service up` within {timeout_s}s; log:\n{''.join(self.logs)}")
        return self._admin_addr

    def stop(self, timeout_s: float = 15) -> int:
        """SIGTERM (graceful drain), SIGKILL after `timeout_s`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def served_logits(stub, pb, task: str, texts: list, ns: list, batch: int = 32, timeout_s: float = 900) -> dict:
    """{n: logits [len(texts), C]} for `task` at each drop depth n (one request per chunk, one TaskRef per n)."""
    out = {n: [] for n in ns}
    for i in range(0, len(texts), batch):
        req = pb.InferRequest(tasks=[pb.TaskRef(name=task, drop_first=n) for n in ns],
                              texts=pb.Texts(texts=texts[i:i + batch]))
        resp = stub.Infer(req, timeout=timeout_s)
        for n, res in zip(ns, resp.results):
            if list(res.dropped_layers) != list(range(n)):
                raise AssertionError(f"{task} n={n}: server dropped {list(res.dropped_layers)}")
            out[n].extend([list(s.logits) for s in res.sequences])
    return {n: np.asarray(v, dtype=np.float32) for n, v in out.items()}
