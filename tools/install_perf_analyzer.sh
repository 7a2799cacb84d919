#!/usr/bin/env bash
# Installs Triton's perf_analyzer into build/perf/ without touching the main venv's pins:
#   - the binary from the tritonclient==2.41.0 wheel (bin/perf_analyzer; PyPI's `perf-analyzer`
#     package is only a placeholder),
#   - libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel (it only has to load; no GPU is used),
#   - Debian's libb64-0d (apt-get, skipped when already installed; needs root).
# Usage: tools/install_perf_analyzer.sh PYTHON OUT_DIR      (Makefile target: perf-analyzer)
set -euo pipefail
PY=${1:?python}
OUT=${2:?out dir}
TRITONCLIENT=tritonclient==2.41.0
CUDART=nvidia-cuda-runtime-cu12==12.9.79

if ! dpkg -s libb64-0d >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "perf_analyzer needs Debian's libb64-0d: run 'apt-get install -y libb64-0d' as root" >&2
    exit 1
  fi
  apt-get install -y -qq libb64-0d >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libb64-0d; }
fi

mkdir -p "$OUT/wheels" "$OUT/bin" "$OUT/lib"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$OUT/wheels" "$TRITONCLIENT" "$CUDART"
"$PY" - "$OUT" <<'PYEOF'
import glob, os, sys, zipfile
out = sys.argv[1]
def extract(pattern, member, dest):
    (wheel,) = glob.glob(os.path.join(out, "wheels", pattern))
    with zipfile.ZipFile(wheel) as z, open(dest, "wb") as f:
        f.write(z.read(member))
    os.chmod(dest, 0o755)
extract("tritonclient-2.41.0-*.whl", "tritonclient-2.41.0.data/data/bin/perf_analyzer", os.path.join(out, "bin", "perf_analyzer"))
extract("nvidia_cuda_runtime_cu12-*.whl", "nvidia/cuda_runtime/lib/libcudart.so.12", os.path.join(out, "lib", "libcudart.so.12"))
PYEOF
# Fails here (not mid-benchmark) if a shared library is still missing.
if LD_LIBRARY_PATH="$OUT/lib" ldd "$OUT/bin/perf_analyzer" | grep -q "not found"; then
  LD_LIBRARY_PATH="$OUT/lib" ldd "$OUT/bin/perf_analyzer" | grep "not found" >&2
  exit 1
fi
echo "perf_analyzer installed in $OUT/bin (run with LD_LIBRARY_PATH=$OUT/lib)"
