#!/usr/bin/env bash
# Trains every adapter of the default repository into models/trained/ (skips runs already saved).
# Run from the repository root after `make train-venv`: two chains of one thread each (more robust than
# one two-thread process on a shared 2-core machine); ~30-40 min on 2 free CPU cores.
#   nice -n 19 tools/train/train_all.sh > build/train_all.log 2>&1 &
set -euo pipefail
PY=${PY:-.venv-train/bin/python}
export PYTHONPATH=tools
mkdir -p build
run() {  # task variant method name
  local out=models/trained/$4
  if [[ -f $out/train_config.json ]]; then echo "skip $4 (already trained)"; return; fi
  "$PY" tools/train/train.py --task "$1" --variant "$2" --method "$3" --threads 1 --out "$out"
}
chain_sentiment() {
  for variant in standard specialized robust; do run sentiment "$variant" seq_bn "sentiment-$variant"; done
  run sentiment standard double_seq_bn sentiment-houlsby
}
chain_other() {
  for task in topic subjectivity; do
    for variant in standard specialized robust; do run "$task" "$variant" seq_bn "$task-$variant"; done
  done
}
chain_sentiment > build/train_sentiment.log 2>&1 &
a=$!
chain_other > build/train_other.log 2>&1 &
b=$!
wait $a && wait $b
echo "all trained"
