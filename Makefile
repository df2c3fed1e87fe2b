# The suite's commands. `make reproduce-all` and `make test` each set up .venv first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= tiny

# torch is a range in environment.yml, never a pin. A machine without an NVIDIA GPU gets the CPU wheel
# first (torch 2.13.0 lies on disk on the suite's machines), so pip never downloads a multi-GB CUDA
# build there; the range is then already satisfied. A GPU machine resolves torch normally.
# Elsewhere, point CPU_TORCH at a CPU index: CPU_TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
CPU_TORCH ?= torch==2.13.0
HAS_NVIDIA_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)

STAMP := $(VENV)/.setup-done

.PHONY: help setup test lint format reproduce-all toy clean

help:
	@echo "make reproduce-all   set up .venv and run the main job (tiny profile, offline)"
	@echo "make test            set up .venv, lint, and run the test suite"
	@echo "make setup | lint | format | toy | clean"

setup: $(STAMP)

$(STAMP): environment.yml pyproject.toml tools/requirements_from_env.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ -z "$(HAS_NVIDIA_GPU)" ]; then $(PY) -m pip install -q --disable-pip-version-check $(CPU_TORCH); fi
	$(PY) tools/requirements_from_env.py environment.yml > $(VENV)/requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check -r $(VENV)/requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q

# ---- the main job -------------------------------------------------------------------------------
# Until the experiment notebooks land, the main job is the toy example config (a run record).
TOY_OUT := results/$(PROFILE)/toy

reproduce-all: toy

toy: setup
	$(PY) examples/toy/build.py runs/toy-assets
	rm -rf runs/toy
	PYTHONPATH=examples/toy $(PY) -m raftlib run examples/toy/config.yaml
	mkdir -p $(TOY_OUT)
	cp runs/toy/config.yaml runs/toy/metrics.jsonl $(TOY_OUT)/
	$(PY) tools/summarize_run.py runs/toy > $(TOY_OUT)/summary.md
	cat $(TOY_OUT)/summary.md

clean:
	rm -rf runs .pytest_cache .ruff_cache
