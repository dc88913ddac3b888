# Two commands for a newcomer: `make demo` and `make test`. Both do all set-up first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= auto
# Pre-built DeepSpeed/torch C++ extensions are cached here (deepspeed_shm_comm takes ~20 s to build).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast lint demo bench gpu-check clean

setup: $(STAMP)

# torch first, by TORCH: cuda (its CUDA build), cpu (its CPU build; plain `pip install torch` on a CPU machine
# pulls a multi-GB CUDA build), auto (the default: cuda where nvidia-smi lists a GPU, cpu otherwise). A venv made on
# a login node without GPUs for GPU nodes: `make setup TORCH=cuda` (on an existing venv, `rm -f .venv/.installed`
# first). TORCH_PIP_ARGS="--index-url <wheel index>": where the build is found (the CPU build where it is not
# local; the CUDA build for an older driver, e.g. https://download.pytorch.org/whl/cu126).
# Optional extras of pyproject.toml: `make setup EXTRAS=wandb` (or wandb,s3,gcs,mpi); TensorBoard is always in.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	case "$(TORCH)" in \
	    cuda | cpu) build=$(TORCH) ;; \
	    auto) build=$$( (nvidia-smi -L 2>/dev/null || true) | grep -q '^GPU' && echo cuda || echo cpu) ;; \
	    *) echo "TORCH=$(TORCH): use cuda, cpu or auto" >&2; exit 2 ;; \
	esac; \
	if [ "$$build" = cuda ]; then \
	    $(PY) -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null || $(PY) -m pip uninstall --quiet -y torch; \
	    $(PY) -m pip install --quiet "$$(grep '^torch==' requirements.txt)" $(TORCH_PIP_ARGS); \
	    $(PY) -c 'import sys, torch; sys.exit(torch.version.cuda is None and "pip installed a CPU build of torch: pass TORCH_PIP_ARGS=\"--index-url https://download.pytorch.org/whl/cuXYZ\"")'; \
	else \
	    $(PY) -m pip install --quiet "$$(grep '^torch==' requirements.txt)" $(TORCH_PIP_ARGS); \
	fi
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(if $(EXTRAS),$(PY) -m pip install --quiet --no-build-isolation -e ".[$(EXTRAS)]")
	# DeepSpeed's CPU communication op is built here, not by the first launch (pipeline/engine/distributed.py
	# build_extensions; it also clears a lock left by a build that was killed).
	$(PY) -c "from pipeline.engine.distributed import build_extensions; build_extensions()"
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the tests that launch ranks: about a minute.
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# ruff, configured in pyproject.toml: the linter, and the formatter's check (`ruff format .` fixes it).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: setup
	bash launch/demo.sh

bench: setup
	$(PY) bench/run_all.py

# On one GPU, at most 10 minutes: bf16 and fp16 pre-training through the deepspeed launcher (draw, prune, rebuild,
# kill -9 after the draw, exact resume), fine-tuning and its export reloaded by transformers, bench_gpu's core cases;
# writes bench/results/gpu-check-<device>.json and .md (bench/gpu_check.py). No setup first: it runs under the venv
# where `make setup` built one, else under the machine's $(PYTHON) (a GPU image's torch and DeepSpeed). Without a
# GPU it says so and exits 0. GPU_CHECK_ARGS=--dry-run prints its commands.
gpu-check:
	$(if $(wildcard $(STAMP)),$(PY),$(PYTHON)) -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .cache runs
