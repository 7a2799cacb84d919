#!/usr/bin/env bash
# `make gpu-check`: the GPU figures of issues 12 and 15 and the equality tests on the CUDA execution
# provider, in one run (docs/benchmarks.md, "GPU check"):
#   1. equality: reference_exactness (numpy reference, every drop depth), banks_server (bank path vs
#      segments), execution_provider, on the provider under test;
#   2. table2 quick on BERT-base (fan-out k = 1, 8; n = 0, 5, 11, 12; fused floor);
#   3. banks bench on BERT-base: one task vs fused at B = 8 and 64; k = 8, n = 5 vs n = 0 and vs 8
#      separate fused graphs; 256 distinct tasks vs one task and vs fused on the same 256 rows;
#   4. runtime.io_binding off / on / on the capturable layer graphs / runtime.cuda_graphs (capturable
#      graphs, row and token buckets, captured and replayed), side by side (benches/io_binding.rs), after
#      tests/io_binding.rs (on vs off within 1e-5, capturable vs dispatched graphs, row buckets, CUDA-graph
#      replays vs plain runs);
#   5. the real-text replay of issue 15 (tools/bench_replay.py) once it exists.
# With an NVIDIA GPU it installs onnxruntime-gpu[cuda,cudnn]==1.31.1 into .venv-gpu (its own venv:
# both ORT wheels install the same `onnxruntime` package) and runs everything on CUDA, full sizes.
# Without one it says so, and runs every step on the CPU provider at small sizes, so the script
# itself is proven end to end on any machine (those figures are not GPU figures).
# Outputs: build/gpu-check/{table2,banks,io_binding}.md and the log on stdout. Environment: PYTHON (for the
# venv), GPU_VENV (.venv-gpu), GPU_CHECK_OUT (build/gpu-check), CARGO_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
GPU_VENV=${GPU_VENV:-.venv-gpu}
OUT=${GPU_CHECK_OUT:-build/gpu-check}
CARGO_FLAGS=${CARGO_FLAGS:-}
# The CPU library `make setup` links (the Makefile exports the same); the CUDA branch replaces it.
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/build/lib/libonnxruntime.so}
mkdir -p "$OUT"

if nvidia-smi -L >/dev/null 2>&1; then
    MODE=cuda
    nvidia-smi -L
    test -x "$GPU_VENV/bin/python" || "${PYTHON:-python3}" -m venv "$GPU_VENV"
    "$GPU_VENV/bin/python" -m pip install -q --disable-pip-version-check "onnxruntime-gpu[cuda,cudnn]==1.31.1"
    ORT_DYLIB_PATH="$("$GPU_VENV/bin/python" -c 'import onnxruntime, pathlib; print(next(pathlib.Path(onnxruntime.__file__).parent.glob("capi/libonnxruntime.so.1.31.*")))')"
    LD_LIBRARY_PATH="$("$GPU_VENV/bin/python" -c 'import nvidia, pathlib; print(":".join(str(p) for p in sorted(pathlib.Path(list(nvidia.__path__)[0]).glob("*/lib"))))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export ORT_DYLIB_PATH LD_LIBRARY_PATH ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER=cuda
    providers="$("$GPU_VENV/bin/python" -c 'import onnxruntime; print(",".join(onnxruntime.get_available_providers()))')"
    echo "gpu-check: CUDA run; $ORT_DYLIB_PATH offers $providers"
    case "$providers" in *CUDAExecutionProvider*) ;; *) echo "gpu-check: the onnxruntime-gpu wheel offers no CUDAExecutionProvider" >&2; exit 1 ;; esac
    TEST_PROFILE=--release
    SIZES=(BENCH_B=8,64 BENCH_T=128 BENCH_ROWS=256 BENCH_ROWS_T=128 BENCH_RUNS=5)
    IO_SIZES=(BENCH_B=8 BENCH_T=128 BENCH_ROWS=256 BENCH_ROWS_T=128 BENCH_RUNS=5)
    TABLE2=(BENCH_QUICK=1 BENCH_K=1,8)
    REPLAY=()
else
    MODE=cpu
    providers="$("$PY" -c 'import onnxruntime; print(",".join(onnxruntime.get_available_providers()))')"
    cat <<EOF
================================================================================================
gpu-check: NO CUDA EXECUTION PROVIDER PRESENT. No NVIDIA GPU is visible (nvidia-smi -L failed),
and the CPU library ($ORT_DYLIB_PATH) offers only: $providers.
Every step below runs on the CPU provider at small sizes, only to prove this script works end to
end. THE FIGURES OF THIS RUN ARE NOT GPU FIGURES. On a machine with a GPU, run \`make gpu-check\`.
================================================================================================
EOF
    unset ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER
    # Debug test binaries: the ones `make test` builds anyway (no second release build of the tests).
    TEST_PROFILE=
    SIZES=(BENCH_B=2,4 BENCH_T=16 BENCH_ROWS=16 BENCH_ROWS_T=8 BENCH_RUNS=1)
    IO_SIZES=(BENCH_B=2 BENCH_T=16 BENCH_ROWS=8 BENCH_ROWS_T=8 BENCH_RUNS=1)
    TABLE2=(BENCH_QUICK=1 BENCH_K=1,8 BENCH_B=2 BENCH_T=16 BENCH_RUNS=1)
    REPLAY=(--quick)
fi

step() { echo; echo "=== gpu-check ($MODE): $*"; }

step "bench repository (BERT-base, 8 tasks, with the capturable layer graphs; built once)"
"$PY" tools/make_bench_repo.py --out build/bench-repo --only bert-base-random --tasks 8 --capturable-layers

step "equality tests on the $MODE provider"
# shellcheck disable=SC2086
cargo test $TEST_PROFILE $CARGO_FLAGS --test reference_exactness --test banks_server --test execution_provider --test io_binding \
    -- --test-threads=1 --nocapture

step "table2 (fan-out, fused floor)"
# shellcheck disable=SC2086
env "${TABLE2[@]}" BENCH_BACKBONES=bert-base-random BENCH_SEPARATE=0 BENCH_OUT="$OUT/table2.md" \
    cargo bench $CARGO_FLAGS --bench table2

step "banks (one task vs fused, k = 8, distinct tasks per row, session runs)"
# shellcheck disable=SC2086
env "${SIZES[@]}" BENCH_BACKBONE=bert-base-random BENCH_OUT="$OUT/banks.md" cargo bench $CARGO_FLAGS --bench banks_scale

step "io_binding off / on / capturable graphs / cuda_graphs with row buckets (bank path, MiniLM test repository)"
# shellcheck disable=SC2086
env "${IO_SIZES[@]}" BENCH_OUT="$OUT/io_binding.md" cargo bench $CARGO_FLAGS --bench io_binding

step "real-text replay (issue 15)"
if [ -f tools/bench_replay.py ]; then
    # It replays the trained tasks' test texts: the default repository (`make models`, idempotent).
    make --no-print-directory models
    # shellcheck disable=SC2086
    cargo build --release $CARGO_FLAGS
    "$PY" tools/bench_replay.py --binary target/release/adapterdrop-serve --repo models/default "${REPLAY[@]}" | tee "$OUT/replay.md"
else
    echo "tools/bench_replay.py (issue 15) is not in this tree yet: no replay step to run"
fi

echo
if [ "$MODE" = cuda ]; then
    echo "gpu-check: done on CUDA; figures in $OUT/ (record them in docs/benchmarks.md)"
else
    echo "gpu-check: done, CPU dry run (NO CUDA provider present): every step ran; the figures in $OUT/ are CPU figures at small sizes"
fi
