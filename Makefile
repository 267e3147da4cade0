# The two commands of the README: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DIFFUSERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install run test tiny-models bench clean

install: $(STAMP)

# torch first, pinned: the local CPU build here; a GPU user sets TORCH=torch (see README).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

tiny-models: install
	$(VENV)/bin/noodle tiny-models .cache/models

run: install tiny-models
	$(VENV)/bin/noodle main

test: install
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/noodle bench engine

clean:
	rm -rf $(VENV) .cache
