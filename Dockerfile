# syntax=docker/dockerfile:1
# adapterdrop-serve, CPU image. Dockerfile.cuda is the CUDA variant. Build from the repository root:
#   docker build -t adapterdrop-serve:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9090:9090 adapterdrop-serve:0.1.0
# Stages: rust (release binary from Cargo.lock), python (ONNX Runtime library from the pinned wheel, and the
# bundled default model repository), runtime (debian-slim, non-root, read-only friendly).

# Must equal the onnxruntime==... pin in tools/requirements.txt (tests/python/test_dockerfiles.py checks).
ARG ORT_VERSION=1.31.1
ARG RUST_VERSION=1.92
ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS rust
WORKDIR /src
# The full rust image has the C compiler that onig (tokenizers) and ring (rustls) need.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY benches benches
COPY examples examples
COPY tests tests
# ort uses load-dynamic: nothing is downloaded or linked at build time; the library comes from the wheel.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin adapterdrop-serve \
 && install -D -m 0755 target/release/adapterdrop-serve /out/bin/adapterdrop-serve

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS python
ARG ORT_VERSION
WORKDIR /src
COPY tools/requirements.txt tools/requirements-nodeps.txt tools/
# Only what the repository builder needs, at the versions pinned in requirements.txt (-c).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c tools/requirements.txt "onnxruntime==${ORT_VERSION}" onnx numpy safetensors \
 && pip install --no-deps -r tools/requirements-nodeps.txt
RUN capi="$(python -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')" \
 && install -D -m 0644 "$capi/libonnxruntime.so.${ORT_VERSION}" "/out/lib/libonnxruntime.so.${ORT_VERSION}" \
 && install -m 0644 "$capi/libonnxruntime_providers_shared.so" /out/lib/
COPY tools tools
# The default repository `make run` serves (MiniLM backbone + two demo tasks): served out of the box, and
# copied by the Helm chart's init container into the pod's writable repository volume.
RUN python tools/make_default_repo.py --out /out/models/default

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
ARG ORT_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 adapterdrop \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin adapterdrop
COPY --from=python /out/lib/ /opt/adapterdrop/lib/
COPY --from=python /out/models/ /opt/adapterdrop/models/
COPY --from=rust /out/bin/adapterdrop-serve /usr/local/bin/adapterdrop-serve
ENV ORT_DYLIB_PATH=/opt/adapterdrop/lib/libonnxruntime.so.${ORT_VERSION}
# repository.path defaults to models/default, relative to here: the bundled repository.
WORKDIR /opt/adapterdrop
# Numeric, so that Kubernetes can enforce runAsNonRoot.
USER 65532:65532
# gRPC (Inference, KServe v2, health, reflection), admin, Prometheus /metrics.
EXPOSE 50051 50052 9090
# SIGTERM: NOT_SERVING on health, drain in-flight and queued requests (server.shutdown_grace_s), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/adapterdrop-serve"]
