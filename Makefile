# Every user-facing action is one target. Needs only python3 and make: uv is bootstrapped if missing,
# and the environment comes from the committed uv.lock.
#   make pretrain [CONFIG=configs/pretrain/<x>.yaml] [ARGS="optim.lr=1e-3 data.batch_size=64"] [NPROC=2]
#   make finetune [PRETRAINED=<run dir|checkpoint dir|MLflow run id>] [CONFIG=...] [ARGS=...]
#   make pipeline [PRETRAIN_CONFIG=... FINETUNE_CONFIG=...] [ARGS=...]   (Slurm: ARGS="launch.cluster=slurm ...")
#   make shards [SHARDS_ARGS="--source /path/to/imagefolder --out data/mine --max-side 512"]
#   make test | make test-fast | make lint | make ui [HOST=127.0.0.1 PORT=5000]

SHELL := /bin/bash
# No brace expansion in recipes: ARGS="data.train_shards=x/train-{0000..0007}.tar" reaches the CLI as typed
# (bash would turn it into eight overrides). Quotes and spaces in ARGS work as in a shell.
.SHELLFLAGS := +B -c
PRETRAIN_CONFIG ?= configs/pretrain/digits_vit.yaml
FINETUNE_CONFIG ?= configs/finetune/digits_vit.yaml
ARGS ?=
NPROC ?=
HOST ?= 127.0.0.1
PORT ?= 5000
PYTEST_ARGS ?=
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1
# DeepSpeed JIT-builds its CPU communication op once per environment; a cache per checkout keeps two checkouts
# (or CI next to a developer's tree) from rebuilding it over each other, each waiting on the other's build lock
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.venv/torch_extensions

UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
RUN := $(UV) run --locked --no-sync python
# NPROC=N adds launch.nproc=N unless ARGS names launch.nproc itself: then what ARGS says wins (and is not given
# twice); two launch.nproc in ARGS are still refused by the CLI as a duplicate
NPROC_IN_ARGS = $(filter launch.nproc=% 'launch.nproc=% "launch.nproc=%,$(ARGS))
LAUNCH_ARGS = $(if $(NPROC),$(if $(NPROC_IN_ARGS),,launch.nproc=$(NPROC)))
# the demo's shards: digits with labels, and the same train split without (self-supervised pretraining)
DEMO_SHARDS := data/digits/manifest.json data/digits_unlabeled/manifest.json

.PHONY: setup pretrain finetune pipeline shards test test-fast lint ui bench

setup: .venv/.synced

.tools/bin/uv:
	@echo "uv not found: installing it into .tools/ from PyPI"
	python3 -m venv .tools && .tools/bin/pip install --quiet uv

.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked
	@touch $@

data/digits/manifest.json: | setup
	$(RUN) -m pipeline shards --source digits --out data/digits

data/digits_unlabeled/manifest.json: | setup
	$(RUN) -m pipeline shards --source digits --unlabeled --out data/digits_unlabeled

shards: setup
	$(RUN) -m pipeline shards $(or $(SHARDS_ARGS),--source digits --out data/digits)

pretrain: setup $(DEMO_SHARDS)
	$(RUN) -m pipeline pretrain --config $(or $(CONFIG),$(PRETRAIN_CONFIG)) $(LAUNCH_ARGS) $(ARGS)

finetune: setup $(DEMO_SHARDS)
	$(RUN) -m pipeline finetune --config $(or $(CONFIG),$(FINETUNE_CONFIG)) $(if $(PRETRAINED),--pretrained $(PRETRAINED)) $(LAUNCH_ARGS) $(ARGS)

# pretrain, then fine-tune from it: in turn locally; on Slurm (ARGS="launch.cluster=slurm ...") as two chained jobs
pipeline: setup $(DEMO_SHARDS)
	$(RUN) -m pipeline pipeline --pretrain-config $(PRETRAIN_CONFIG) --finetune-config $(FINETUNE_CONFIG) $(LAUNCH_ARGS) $(ARGS)

# everything: unit, end-to-end (real DeepSpeed processes, MLflow server, browser) and the Slurm cluster tests
test: setup
	$(RUN) -m pytest $(PYTEST_ARGS)

# the inner loop: unit tests only (267 tests, 1 min 22 s on the 2-core VM beside a training run, 2026-12-03)
test-fast: setup
	$(RUN) -m pytest tests/unit $(PYTEST_ARGS)

lint: setup
	$(UV) run --locked --no-sync ruff check .
	$(UV) run --locked --no-sync ruff format --check .

bench: setup
	$(RUN) -m benchmarks.bench --config $(or $(CONFIG),configs/bench/cpu_vit_tiny.yaml) $(ARGS)

ui: setup
	$(RUN) -m pipeline ui --host $(HOST) --port $(PORT)

.PHONY: tracking-sync bench-tracking bench-data bench-checkpoint bench-startup gpu-check
# What a checkpoint save blocks the loop for, synchronous vs background write (2 ranks, ZeRO-1 and 2; docs/performance.md)
bench-checkpoint: setup
	$(RUN) -m benchmarks.checkpoint $(ARGS)

# Where the time from `make pretrain` to the first step and the first metric goes, phase by phase (docs/performance.md)
bench-startup: setup
	$(RUN) -m benchmarks.startup $(ARGS)

# The CUDA paths end to end on one GPU in <= 8 minutes, report under runs/gpu-check/; refuses (exit 2) without CUDA
gpu-check: setup
	@$(RUN) -m benchmarks.gpu_check $(ARGS)

# What foreign and thousands of shards cost before the first step: indexing, cached re-plan, start-up per 1,000 shards
bench-data: setup
	$(RUN) -m benchmarks.bench_data $(ARGS)

# What MLflow tracking costs a training step, against a real mlflow server on loopback (docs/performance.md)
bench-tracking: setup
	$(RUN) -m benchmarks.bench_tracking $(ARGS)

# Upload a run's MLflow records kept while the tracking server was unreachable: make tracking-sync RUN_DIR=runs/<dir>
tracking-sync: setup
	@test -n "$(RUN_DIR)" || { echo "usage: make tracking-sync RUN_DIR=runs/<run folder>" >&2; exit 2; }
	$(RUN) -m pipeline tracking-sync $(RUN_DIR)
