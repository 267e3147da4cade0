# The two commands of the README: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
# Exact versions this tree was tested with (`make lock` refreshes them on purpose). Torch is not in it:
# TORCH above picks the build. `make install CONSTRAINTS=` installs the newest allowed versions instead.
CONSTRAINTS ?= constraints.txt
CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
LOCK_VENV := .cache/lock-venv
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DIFFUSERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install lock run test tiny-models bench gpu-kit gpu-check clean

install: $(STAMP)

# torch first, pinned: the local CPU build here; a GPU user sets TORCH=torch (see README).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q $(CONSTRAINT_FLAG) -e ".[test,ray]"
	touch $(STAMP)

# Resolve pyproject.toml afresh in a throwaway venv and write the versions it got to constraints.txt
# (torch, its CUDA wheels and the project itself left out), so every later install gets exactly those.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q "$(TORCH)"
	$(LOCK_VENV)/bin/pip install -q -e ".[test,ray]"
	{ echo "# Exact versions Noodle is tested with: written by 'make lock' on $$(date -u +%F), used by 'make install'."; \
	  echo "# torch is chosen by the Makefile's TORCH (the CPU build here, a CUDA build on a GPU box), not here."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-|cuda-|noodle-bot)[-=_ ]' ; } > constraints.txt
	rm -rf $(LOCK_VENV)
	@echo "constraints.txt: $$(grep -vc '^#' constraints.txt) pinned packages"

tiny-models: install
	$(VENV)/bin/noodle tiny-models .cache/models

run: install tiny-models
	$(VENV)/bin/noodle main

test: install
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/noodle bench engine

# The GPU figures (noodle bench gpu: Noodle against ComfyUI and diffusers at full size), for a GPU machine that
# reaches no package index. Here: `make gpu-kit COMFY_MIRROR=<git dir of Comfy-Org/ComfyUI>` fills .gpukit/ (the
# wheels that machine lacks, ComfyUI's source; about 52 MiB). There, beside a CUDA torch: `make gpu-check`.
COMFY_MIRROR ?=
GPU_PYTHON ?= python3
GPU_OUT ?= .
gpu-kit: install
	@test -n "$(COMFY_MIRROR)" || { echo "make gpu-kit needs COMFY_MIRROR=<a git directory of Comfy-Org/ComfyUI>"; exit 2; }
	$(PY) tests/gpu_kit.py build --comfy-mirror "$(COMFY_MIRROR)"

gpu-check:
	$(GPU_PYTHON) tests/gpu_kit.py install --python "$$(command -v $(GPU_PYTHON))" --venv .gpuvenv
	.gpuvenv/bin/noodle bench gpu --models .cache/gpu-models --repeats 3 --out "$(GPU_OUT)/gpu-figures.json"

clean:
	rm -rf $(VENV) .cache .gpuvenv
