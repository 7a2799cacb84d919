"""The test servers bind only ephemeral ports and say why when they do not start.

A server started by the test helpers must come up while the default ports (gRPC 50051, admin 50052,
metrics 9090) are taken by something else (a Prometheus, another server, another test run), and a
server that cannot start must fail the test with its own log, not with a bare timeout."""
import errno
import socket
from pathlib import Path

import grpc
import pytest

from adapterdrop_tools.served import Server

from .conftest import _ort_library, _server_binary, _test_repo

DEFAULT_PORTS = (50051, 50052, 9090)


@pytest.fixture
def default_ports_taken():
    """Holds 0.0.0.0:<port> for each default port that is free (one already held elsewhere is taken too)."""
    held = []
    for port in DEFAULT_PORTS:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("0.0.0.0", port))
            s.listen(1)
            held.append(s)
        except OSError as e:
            s.close()
            assert e.errno == errno.EADDRINUSE, e
    yield
    for s in held:
        s.close()


def test_helper_servers_use_no_fixed_port(default_ports_taken):
    srv = Server(_server_binary(), _test_repo(), timeout_s=120, extra_env={"ORT_DYLIB_PATH": str(_ort_library())})
    try:
        admin = srv.admin_addr()
        for addr in (srv.addr, admin, srv.metrics_addr):
            host, port = addr.rsplit(":", 1)
            assert host == "127.0.0.1" and int(port) not in DEFAULT_PORTS, addr
        with grpc.insecure_channel(srv.addr) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
    finally:
        assert srv.stop(30) == 0, "".join(srv.logs)


def test_admin_register_fixture_uses_no_fixed_port(default_ports_taken, tmp_path_factory):
    from . import test_admin_register

    gen = test_admin_register.admin_server.__wrapped__(tmp_path_factory)
    started = next(gen)
    try:
        assert started["server"].metrics_addr.startswith("127.0.0.1:"), started
        assert started["admin"].startswith("127.0.0.1:") and started["addr"].startswith("127.0.0.1:"), started
    finally:
        gen.close()


def test_a_server_that_cannot_start_fails_with_its_log(tmp_path):
    missing = tmp_path / "no-such-repository"
    with pytest.raises(RuntimeError) as err:
        Server(_server_binary(), missing, timeout_s=60, extra_env={"ORT_DYLIB_PATH": str(_ort_library())})
    text = str(err.value)
    assert "did not report `listening`" in text and "log:" in text
    # The server's own words, which say what to fix.
    assert f"model repository {missing} does not exist" in text, text
    assert not Path(missing).exists()
