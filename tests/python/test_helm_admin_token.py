"""helm/adapterdrop-serve's admin token: with the admin port on and no token Secret given, the chart
generates one (randAlphaNum) on install and keeps it across upgrades (lookup). Rendered with the Helm SDK;
the upgrade renders against a minimal fake Kubernetes API server that serves the Secret to `lookup`."""
from __future__ import annotations

import json
import re

import pytest

yaml = pytest.importorskip("yaml")
helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (make setup)")

from .test_helm_chart import CHART, FULLNAME, NAMESPACE, RELEASE, helm_chart, objects, server_container  # noqa: E402


ADMIN_SECRET = f"{FULLNAME}-admin-token"


def admin_token_env(objs) -> dict | None:
    env = server_container(objs).get("env") or []
    return next((e for e in env if e["name"] == "ADAPTERDROP__AUTH__ADMIN_TOKEN"), None)


def generated_token(objs) -> str:
    import base64

    secret = objs[("Secret", ADMIN_SECRET)]
    assert secret["type"] == "Opaque" and secret["metadata"]["namespace"] == NAMESPACE
    return base64.b64decode(secret["data"]["admin-token"]).decode()


def test_admin_port_defaults_to_a_generated_token():
    """admin.enabled without auth.existingSecret: the chart makes a random token Secret and the server reads it."""
    first, second = objects({"admin": {"enabled": True}}), objects({"admin": {"enabled": True}})
    token = generated_token(first)
    assert re.fullmatch(r"[A-Za-z0-9]{48}", token), token
    assert token != generated_token(second), "each install must get its own random token"
    ref = admin_token_env(first)["valueFrom"]["secretKeyRef"]
    assert ref == {"name": ADMIN_SECRET, "key": "admin-token"}
    # The key name follows auth.adminTokenKey.
    custom = objects({"admin": {"enabled": True}, "auth": {"adminTokenKey": "token"}})
    assert admin_token_env(custom)["valueFrom"]["secretKeyRef"] == {"name": ADMIN_SECRET, "key": "token"}
    assert "token" in custom[("Secret", ADMIN_SECRET)]["data"]
    # An existing Secret wins; generateAdminToken=false keeps the server's open default; no admin port, no token.
    existing = objects({"admin": {"enabled": True}, "auth": {"existingSecret": "mine"}})
    assert ("Secret", ADMIN_SECRET) not in existing
    assert admin_token_env(existing)["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "admin-token"}
    opted_out = objects({"admin": {"enabled": True}, "auth": {"generateAdminToken": False}})
    assert ("Secret", ADMIN_SECRET) not in opted_out and admin_token_env(opted_out) is None
    off = objects({})
    assert not any(kind == "Secret" for kind, _ in off) and admin_token_env(off) is None


class _FakeKubeApi:
    """Just enough of a Kubernetes API server for Helm's `lookup` of one Secret (discovery + GET), over
    plain HTTP on an ephemeral port; records the paths asked for."""

    def __init__(self, secrets: dict):
        import http.server
        import threading

        api = self
        self.paths: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                api.paths.append(path)
                body, code = api.answer(path, secrets)
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def answer(path: str, secrets: dict) -> tuple[dict, int]:
        if path == "/version":
            return {"major": "1", "minor": "31", "gitVersion": "v1.31.0", "platform": "linux/amd64"}, 200
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}, 200
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}, 200
        if path == "/api/v1":
            return {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
                 "verbs": ["get", "list", "create", "update", "delete"]}]}, 200
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/secrets/([^/]+)", path)
        if m and (m[1], m[2]) in secrets:
            return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": m[2], "namespace": m[1]}, "data": secrets[(m[1], m[2])]}, 200
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                "message": f"{path} not found"}, 404

    def close(self):
        self.httpd.shutdown()


def test_generated_admin_token_is_kept_across_upgrades():
    """An upgrade renders against the cluster: `lookup` finds the Secret the install made and keeps its token."""
    import base64

    kept = base64.b64encode(b"token-made-at-install").decode()
    api = _FakeKubeApi({(NAMESPACE, ADMIN_SECRET): {"admin-token": kept}})
    kubeconfig = yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u", "namespace": NAMESPACE}}],
        "users": [{"name": "u", "user": {"token": "t"}}]})
    try:
        with helm_python.Config(namespace=NAMESPACE, kubeconfig_content=kubeconfig) as cfg, \
                helm_chart.Chart.load(CHART) as chart:
            def render_upgrade(values):
                out = cfg.render(chart, values=values, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
                return {(d["kind"], d["metadata"]["name"]): d for path, text in out.items()
                        if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d}

            objs = render_upgrade({"admin": {"enabled": True}})
            assert generated_token(objs) == "token-made-at-install"
            assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{ADMIN_SECRET}" in api.paths
            # A Secret without the key (e.g. auth.adminTokenKey changed): a new random token under the new key.
            objs = render_upgrade({"admin": {"enabled": True}, "auth": {"adminTokenKey": "other"}})
            token = base64.b64decode(objs[("Secret", ADMIN_SECRET)]["data"]["other"]).decode()
            assert re.fullmatch(r"[A-Za-z0-9]{48}", token)
    finally:
        api.close()
