"""helm/adapterdrop-serve: lint and render with the Helm SDK, validate every manifest against the Kubernetes
1.31 schemas, check the properties operations depend on, and start the real server with the rendered config.

Three value sets: the defaults, the GPU preset (values-gpu.yaml) and one that turns every optional feature on.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import grpc
import pytest

yaml = pytest.importorskip("yaml")
helm_chart = pytest.importorskip("helm_python.chart", reason="helm-python-sdk is not installed (make setup)")
helm_errors = pytest.importorskip("helm_python.errors")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")

from adapterdrop_tools.served import Server  # noqa: E402

from .conftest import _ort_library, _server_binary, _test_repo  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "adapterdrop-serve"
KUBE_VERSION = "1.31"
RELEASE, NAMESPACE = "r", "ns"
FULLNAME = "r-adapterdrop-serve"
INFERENCE_SERVICE = "adapterdrop.v1.Inference"

# Keys agreed for the branches being merged (CONFIG-KEYS.md) that src/config/mod.rs may not have yet. Once they
# exist in src/config/mod.rs this list is redundant; the test parses src/config/mod.rs for everything else.
AGREED_KEYS = {
    "admin": {"listen"},
    "auth": {"admin_token", "inference_token"},
    "repository": {"poll_interval_s"},
    "metrics": {"listen"},
    "tls": {"cert_path", "key_path", "client_ca_path"},
    "runtime": {"execution_provider", "cuda_device_id", "cuda_memory_limit_bytes"},
}

ALL_FEATURES = {
    "admin": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "autoscaling": {"enabled": True, "customMetric": {"enabled": True}},
    "auth": {"existingSecret": "adapterdrop-tokens"},
    "tls": {"enabled": True, "secretName": "adapterdrop-tls", "clientCA": True},
    "modelRepository": {"source": "pvc", "pvc": {"storageClassName": "nfs", "seed": True}},
    "preStopSleepSeconds": 5,
    "imagePullSecrets": [{"name": "regcred"}],
    "podDisruptionBudget": {"maxUnavailable": None, "minAvailable": 1},
}


def config_rs_keys() -> dict[str, set[str]]:
    """Sections and keys the server accepts today, read from src/config/mod.rs (deny_unknown_fields)."""
    src = (ROOT / "src" / "config" / "mod.rs").read_text(encoding="utf-8")
    structs = {m[1]: set(re.findall(r"^\s*pub (\w+):", m[2], re.M)) for m in re.finditer(r"pub struct (\w+) \{(.*?)\n\}", src, re.S)}
    sections = re.search(r"pub struct Settings \{(.*?)\n\}", src, re.S)[1]
    return {name: structs[ty] for name, ty in re.findall(r"pub (\w+): (\w+),", sections)}


def known_keys() -> dict[str, set[str]]:
    keys = {k: set(v) for k, v in config_rs_keys().items()}
    for section, names in AGREED_KEYS.items():
        keys.setdefault(section, set()).update(names)
    return keys


def gpu_values() -> dict:
    return yaml.safe_load((CHART / "values-gpu.yaml").read_text(encoding="utf-8"))


VALUE_SETS = {"default": {}, "gpu": gpu_values(), "all-features": ALL_FEATURES}


def render(values: dict) -> dict[str, list[dict]]:
    """Template path -> the non-empty YAML documents it renders (NOTES.txt excluded)."""
    with helm_chart.Chart.load(CHART) as chart:
        out = chart.render(values=copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)
    docs = {}
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        docs[path] = [d for d in yaml.safe_load_all(text) if d]
    return docs


def objects(values: dict) -> dict[tuple[str, str], dict]:
    found = {}
    for docs in render(values).values():
        for doc in docs:
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} rendered twice"
            found[key] = doc
    return found


def deployment(objs) -> dict:
    return objs[("Deployment", FULLNAME)]


def server_container(objs) -> dict:
    containers = deployment(objs)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "server")


def config_toml(objs) -> dict:
    return tomllib.loads(objs[("ConfigMap", FULLNAME)]["data"]["config.toml"])


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_is_clean(name):
    report = helm_chart.lint(CHART, copy.deepcopy(VALUE_SETS[name]), strict=True, namespace=NAMESPACE)
    assert report["errors"] == [], report
    # Severity 1 is informational ("icon is recommended"); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def check_service_monitor(sm: dict, objs) -> None:
    """ServiceMonitor is a CRD without a schema here: check what makes it scrape the right thing."""
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [o for (kind, _), o in objs.items() if kind == "Service"
                and sm["spec"]["selector"]["matchLabels"].items() <= o["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == [FULLNAME], "exactly the ClusterIP Service is scraped"
    ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"] and "metrics" in ports
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_validates(name):
    objs = objects(VALUE_SETS[name])
    kinds = {kind for kind, _ in objs}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget"} <= kinds
    for (kind, obj_name), doc in objs.items():
        assert doc["metadata"].get("namespace") == NAMESPACE, (kind, obj_name)
        labels = doc["metadata"]["labels"]
        for label in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                      "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert label in labels, (kind, obj_name, label)
        if kind == "ServiceMonitor":
            check_service_monitor(doc, objs)
            continue
        # The agreed target version, the newest schemas, and the chart's kubeVersion floor (1.27) for the
        # value sets that do not use the preStop sleep action (1.30+).
        versions = [KUBE_VERSION, kubernetes_validate.latest_version()] + (["1.27"] if name != "all-features" else [])
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{kind}/{obj_name} is invalid for Kubernetes {version}: {e}")


@pytest.mark.parametrize("name", VALUE_SETS)
def test_config_file_uses_only_known_keys_and_matches_the_ports(name):
    objs = objects(VALUE_SETS[name])
    cfg = config_toml(objs)
    known = known_keys()
    for section, keys in cfg.items():
        assert section in known, f"unknown config section [{section}]"
        assert set(keys) <= known[section], f"[{section}] unknown keys {set(keys) - known[section]}"
    container = server_container(objs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert cfg["server"]["listen"] == f"0.0.0.0:{ports['grpc']}"
    assert cfg["metrics"]["listen"] == (f"0.0.0.0:{ports['metrics']}" if "metrics" in ports else "")
    assert cfg["admin"]["listen"] == (f"0.0.0.0:{ports['admin']}" if "admin" in ports else "")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[cfg["repository"]["path"]] == "models"
    # The file the server is pointed at is the ConfigMap's config.toml.
    args = container["args"]
    path = Path(args[args.index("--config") + 1])
    assert mounts[str(path.parent)] == "config" and path.name == "config.toml"
    volumes = {v["name"]: v for v in deployment(objs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == FULLNAME


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pod_is_hardened_and_drains_within_its_grace_period(name):
    objs = objects(VALUE_SETS[name])
    pod = deployment(objs)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, c["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["tmp"]
    grace = config_toml(objs)["server"]["shutdown_grace_s"]
    pre_stop = server_container(objs).get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] > grace + pre_stop
    assert server_container(objs)["resources"]["requests"]["cpu"]
    tsc = pod["topologySpreadConstraints"][0]
    assert tsc["labelSelector"]["matchLabels"] == deployment(objs)["spec"]["selector"]["matchLabels"]


def test_probes_are_grpc_health_checks_on_the_grpc_port():
    c = server_container(objects({}))
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port, probe
    assert c["livenessProbe"]["grpc"]["service"] == ""
    assert c["readinessProbe"]["grpc"]["service"] in ("", INFERENCE_SERVICE)


def test_tls_uses_tcp_probes_and_mounts_the_secret_where_the_config_points():
    objs = objects(ALL_FEATURES)
    c = server_container(objs)
    # Kubelet's gRPC probe cannot do TLS.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["tcpSocket"]["port"] == "grpc" and "grpc" not in c[probe], probe
    tls = config_toml(objs)["tls"]
    pod = deployment(objs)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    for key, volume in (("cert_path", "tls"), ("key_path", "tls"), ("client_ca_path", "client-ca")):
        path = Path(tls[key])
        assert mounts[volume]["mountPath"] == str(path.parent) and mounts[volume]["readOnly"] is True
        assert path.name in {i["path"] for i in volumes[volume]["secret"]["items"]}
    assert volumes["tls"]["secret"]["secretName"] == "adapterdrop-tls"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env["ADAPTERDROP__AUTH__ADMIN_TOKEN"] == {"name": "adapterdrop-tokens", "key": "admin-token"}
    assert env["ADAPTERDROP__AUTH__INFERENCE_TOKEN"] == {"name": "adapterdrop-tokens", "key": "inference-token"}


def test_services_and_headless_service_for_client_side_balancing():
    objs = objects(ALL_FEATURES)
    pod_labels = deployment(objs)["spec"]["template"]["metadata"]["labels"]
    main, headless = objs[("Service", FULLNAME)], objs[("Service", f"{FULLNAME}-headless")]
    assert {p["name"]: p["port"] for p in main["spec"]["ports"]} == {"grpc": 50051, "metrics": 9090, "admin": 50052}
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    assert {p["name"] for p in headless["spec"]["ports"]} == {"grpc", "admin"}
    for svc in (main, headless):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        container_ports = {p["name"] for p in server_container(objs)["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports
    default = objects({})
    assert {p["name"] for p in default[("Service", FULLNAME)]["spec"]["ports"]} == {"grpc", "metrics"}


def test_gpu_preset_requests_a_gpu_and_the_cuda_provider():
    objs = objects(gpu_values())
    c = server_container(objs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":0.1.0-cuda")
    runtime = config_toml(objs)["runtime"]
    assert runtime["execution_provider"] == "cuda" and runtime["cuda_device_id"] == 0
    pod = deployment(objs)["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
    assert config_toml(objects({}))["runtime"]["execution_provider"] == "cpu"


def test_autoscaler_pvc_and_monitoring_when_enabled():
    objs = objects(ALL_FEATURES)
    assert "replicas" not in deployment(objs)["spec"], "the HPA owns the replica count"
    hpa = objs[("HorizontalPodAutoscaler", FULLNAME)]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "adapterdrop_queue_depth"
    pvc = objs[("PersistentVolumeClaim", f"{FULLNAME}-models")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "nfs"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pod = deployment(objs)["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert [c["name"] for c in pod["initContainers"]] == ["seed-models"]
    assert ("ServiceMonitor", FULLNAME) in objs
    assert objs[("PodDisruptionBudget", FULLNAME)]["spec"]["minAvailable"] == 1
    # An existing claim is used as is, and nothing is created.
    existing = objects({"modelRepository": {"source": "pvc", "pvc": {"existingClaim": "shared-models"}}})
    assert not [k for k in existing if k[0] == "PersistentVolumeClaim"]
    pod = deployment(existing)["spec"]["template"]["spec"]
    assert pod["volumes"][2]["persistentVolumeClaim"]["claimName"] == "shared-models" and "initContainers" not in pod
    # Off by default.
    assert not {k[0] for k in objects({})} & {"HorizontalPodAutoscaler", "ServiceMonitor", "PersistentVolumeClaim"}


def test_a_config_change_rolls_the_pods():
    def checksum(values):
        return deployment(objects(values))["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"config": {"batching": {"max_queued": 7}}})


# (values, what the values schema says, what the templates say when the schema is skipped or allows it)
MISTAKES = [
    ({"config": {"server": {"listen": "0.0.0.0:1"}}}, "additional properties 'listen' not allowed",
     "config.server.listen is set by the chart"),
    ({"config": {"repository": {"path": "/x"}}}, "additional properties 'path' not allowed",
     "config.repository.path is set by the chart"),
    ({"config": {"batching": {"max_queued": [1]}}}, "/config/batching/max_queued",
     "config values must be strings, numbers or booleans"),
    ({"modelRepository": {"source": "s3"}}, "value must be one of 'image', 'pvc'",
     "modelRepository.source must be image or pvc"),
    ({"tls": {"enabled": True}}, None, "tls.enabled needs tls.secretName"),
    ({"podDisruptionBudget": {"minAvailable": 1}}, None, "exactly one of minAvailable and maxUnavailable"),
    ({"config": {"runtime": {"execution_provider": "gpu"}}}, "value must be one of 'cpu', 'cuda'", None),
    ({"config": {"auth": {"admin_token": "s3cret"}}}, "additional properties 'admin_token' not allowed", None),
    ({"modelRepository": {"sorce": "pvc"}}, "additional properties 'sorce' not allowed", None),
]


@pytest.mark.parametrize("values, schema_message, template_message", MISTAKES)
def test_mistakes_fail_the_render_with_a_clear_message(values, schema_message, template_message, tmp_path):
    with pytest.raises(helm_errors.HelmError, match=re.escape(schema_message or template_message)):
        render(values)
    if template_message:
        # The templates guard on their own too (helm --skip-schema-validation, or a schema that allows it).
        chart = shutil.copytree(CHART, tmp_path / "chart")
        (chart / "values.schema.json").unlink()
        with helm_chart.Chart.load(chart) as c, pytest.raises(helm_errors.HelmError, match=re.escape(template_message)):
            c.render(values=copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)


def test_values_schema_covers_exactly_the_server_keys():
    """Every key the server accepts can be set through config (or is set by the chart, or comes from a
    Secret), and the schema names no key the server would reject."""
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    sections = schema["properties"]["config"]["properties"]
    offered = {(sec, key) for sec, body in sections.items() for key in body["properties"]}
    by_chart = {("server", "listen"), ("metrics", "listen"), ("admin", "listen"), ("repository", "path"),
                ("tls", "cert_path"), ("tls", "key_path"), ("tls", "client_ca_path")}
    from_secret = {("auth", "admin_token"), ("auth", "inference_token")}
    known = {(sec, key) for sec, keys in known_keys().items() for key in keys}
    assert offered | by_chart | from_secret == known, "update helm/adapterdrop-serve/values.schema.json"
    assert not offered & (by_chart | from_secret)


def init_script(values: dict) -> tuple[str, dict]:
    init = deployment(objects(values))["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"] == ["/bin/sh", "-ec"]
    return init["args"][0], {e["name"]: e["value"] for e in init["env"]}


def run_init(script: str, src: Path, dst: Path, host: str) -> str:
    env = {"PATH": os.environ["PATH"], "SRC": str(src), "DST": str(dst), "HOSTNAME": host}
    done = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def make_repo(root: Path, marker: str) -> Path:
    (root / "backbones" / "b").mkdir(parents=True)
    (root / "backbones" / "b" / "backbone.json").write_text(marker)
    (root / "tasks" / "t" / "1").mkdir(parents=True)
    (root / "tasks" / "t" / "1" / "task.json").write_text(marker)
    return root


def test_init_container_scripts_copy_and_seed_the_repository(tmp_path):
    script, env = init_script({})
    assert env == {"SRC": "/opt/adapterdrop/models/default", "DST": "/models"}
    src = make_repo(tmp_path / "bundled", "bundled")
    out = tmp_path / "emptydir"
    out.mkdir()
    run_init(script, src, out, "pod-a")
    assert (out / "tasks" / "t" / "1" / "task.json").read_text() == "bundled"

    seed, _ = init_script(ALL_FEATURES)
    shared = tmp_path / "pvc"
    shared.mkdir()
    assert "seeded backbones" in run_init(seed, src, shared, "pod-a")
    assert (shared / "backbones" / "b" / "backbone.json").read_text() == "bundled"
    assert sorted(p.name for p in shared.iterdir()) == ["backbones", "tasks"], "no temporary copy left"
    # A repository that is already there (tasks registered since) is never overwritten.
    (shared / "tasks" / "t" / "1" / "task.json").write_text("registered")
    assert "not seeding" in run_init(seed, make_repo(tmp_path / "other", "other"), shared, "pod-b")
    assert (shared / "tasks" / "t" / "1" / "task.json").read_text() == "registered"
    # A replica that lost the race (tasks/ already moved in by another) keeps the winner's copy.
    (shared / "backbones").rename(tmp_path / "moved-away")
    assert "tasks already present; kept" in run_init(seed, src, shared, "pod-c")
    assert (shared / "tasks" / "t" / "1" / "task.json").read_text() == "registered"
    assert (shared / "backbones" / "b" / "backbone.json").read_text() == "bundled"


def test_the_server_accepts_the_rendered_config_and_serves_the_readiness_service(tmp_path):
    """Starts the real binary with the chart's config.toml (keys the binary does not accept are left out;
    the schema test above keeps the two in step) and asks grpc.health.v1 what the kubelet's probes ask."""
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
    objs = objects({})
    cfg_text = objs[("ConfigMap", FULLNAME)]["data"]["config.toml"]
    accepted = config_rs_keys()
    kept = []
    section = None
    for line in cfg_text.splitlines():
        if m := re.match(r"\[(\w+)\]", line.strip()):
            section = m[1]
            if section in accepted:
                kept.append(line)
        elif m := re.match(r"(\w+) =", line.strip()):
            if section in accepted and m[1] in accepted[section]:
                kept.append(line)
    path = tmp_path / "config.toml"
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    tomllib.loads(path.read_text())
    # Only what a test machine needs differently from a pod: free ports and the test repository.
    binary = os.environ.get("ADAPTERDROP_SERVER_BINARY") or str(_server_binary())
    server = Server(binary, str(_test_repo()), timeout_s=120, extra_env={"ORT_DYLIB_PATH": str(_ort_library())},
                    args=("--config", path))
    try:
        with grpc.insecure_channel(server.addr) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            c = server_container(objs)
            for service in (c["livenessProbe"]["grpc"]["service"], c["readinessProbe"]["grpc"]["service"]):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    finally:
        code = server.stop(40)
    assert code == 0, f"no graceful exit on SIGTERM:\n{''.join(server.logs)}"


def test_notes_tell_the_client_target_and_warn_about_risky_settings():
    def notes(values):
        with helm_chart.Chart.load(CHART) as chart:
            out = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
        return next(text for path, text in out.items() if path.endswith("NOTES.txt"))

    default = notes({})
    assert f"dns:///{FULLNAME}-headless.{NAMESPACE}.svc.cluster.local:50051" in default
    assert "WARNING" not in default
    risky = notes({"admin": {"enabled": True}})
    assert "each pod has its own copy" in risky and "without a token" not in risky
    assert f"get secret {FULLNAME}-admin-token" in risky
    open_admin = notes({"admin": {"enabled": True}, "auth": {"generateAdminToken": False}})
    assert "without a token" in open_admin and "get secret" not in open_admin
    assert "WARNING" not in notes(copy.deepcopy(ALL_FEATURES))

