# kpipe — `make help` lists the targets. EXP and COMP pick the experiment and competition:
#   make folds train infer COMP=dog-breed EXP=configs/exp/resnet50.yaml ARGS="train.lr=3e-4"
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The interpreter that creates .venv: the first of these on PATH that is Python >= 3.11 (kaggle 2.2.x
# and kagglesdk need 3.11). Override with PYTHON=/path/to/python3.12.
PY_CANDIDATES := python3.13 python3.12 python3.11 python3
PY_OK := import sys; sys.exit(sys.version_info < (3, 11))
PYTHON ?= $(firstword $(foreach p,$(PY_CANDIDATES),$(shell $(p) -c '$(PY_OK)' >/dev/null 2>&1 && echo $(p))))
VENV   := .venv
PY     := $(VENV)/bin/python
KPIPE  := $(VENV)/bin/kpipe
STAMP  := $(VENV)/.kpipe-setup-stamp

COMP ?= demo
EXP  ?= configs/exp/demo.yaml
ARGS ?=
GPUS ?= 0
FILE ?=
MSG  ?=
RUNS ?= runs/$(notdir $(basename $(EXP)))

RUN := $(KPIPE)
CFG := -c $(EXP) --comp $(COMP)

.PHONY: help setup check-python demo test test-fast lint audit folds train relabel infer oof-tta ensemble submit package kernel lb runs compare sweep bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: COMP=$(COMP) EXP=$(EXP) ARGS='key=value ...' GPUS=N"

setup: $(STAMP) ## create .venv and install kpipe with its dependencies (quick when done)

# Re-runs only when pyproject.toml changes. torch comes from the registry's regular (CUDA) build:
# it runs on CPU too, and the registry's torchvision only loads against it.
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory check-python PYTHON="$(PYTHON)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

check-python: ## stop unless PYTHON (default: found on PATH) is Python >= 3.11, naming what was found
	@if [ -z "$(PYTHON)" ] || ! $(PYTHON) -c '$(PY_OK)' >/dev/null 2>&1; then \
	  echo "kpipe needs Python >= 3.11 (kaggle 2.2.x and kagglesdk require it). Found:" >&2; \
	  found=0; for p in $(or $(PYTHON),$(PY_CANDIDATES)); do \
	    v=$$($$p -c 'import sys; print(sys.version.split()[0])' 2>/dev/null) || continue; \
	    found=1; echo "  $$p ($$(command -v $$p)): Python $$v" >&2; \
	  done; \
	  [ $$found = 1 ] || echo "  none: no $(or $(PYTHON),$(PY_CANDIDATES)) on PATH" >&2; \
	  echo "Install Python 3.11 or newer (Ubuntu 22.04: sudo apt install python3.11 python3.11-venv;" \
	       "or pyenv install 3.11), then run make again, or name it: make setup PYTHON=/path/to/python3.11" >&2; \
	  exit 1; \
	fi

DEMO := -c configs/exp/demo.yaml --comp demo
DEMO_ACCEPT ?= 0.5

demo: setup ## build the demo competition and run the whole pipeline on it, end to end
	$(RUN) demo-data
	$(RUN) audit --comp demo
	$(RUN) folds --comp demo folds.clean_labels=false
	$(RUN) train $(DEMO) name=demo_raw train.label_smoothing=0 --resume  # cleaning reads unsmoothed OOF
	$(RUN) relabel $(DEMO) name=demo_raw --accept-above $(DEMO_ACCEPT)
	$(RUN) relabel $(DEMO) name=demo_raw --apply
	$(RUN) folds --comp demo
	$(RUN) train $(DEMO) --resume
	$(RUN) infer $(DEMO)
	$(RUN) demo-report

test: setup ## run the test suite (CPU, a few minutes)
	$(PY) -m pytest -q

test-fast: setup ## the tests without the slow end-to-end ones
	$(PY) -m pytest -q -m "not slow"

runs: setup ## one table of every run under runs/ (ARGS="--sort cv --csv runs.csv")
	$(RUN) runs $(ARGS)

compare: setup ## pictures of runs side by side (RUNS="r18 r34" ARGS="--baseline r18")
	$(RUN) compare $(RUNS) $(ARGS)

sweep: setup ## train a grid of EXP variants (ARGS="'model.name=resnet10t|resnet18' 'train.optimizer=sgd|adamw'")
	$(RUN) sweep $(CFG) $(ARGS)

lint: setup ## ruff over src/ and tests/ (lint and format)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

audit: setup ## find corrupt files, duplicates and train/test leakage in COMP
	$(RUN) audit $(CFG) $(ARGS)

folds: setup ## write folds/<COMP>.csv (stratified, duplicate-grouped K folds)
	$(RUN) folds $(CFG) $(ARGS)

train: setup ## train EXP on COMP (GPUS=N for DDP over N GPUs)
	$(RUN) train $(CFG) $(if $(filter-out 0,$(GPUS)),--gpus $(GPUS)) $(ARGS)

relabel: setup ## suggest relabels from EXP's out-of-fold predictions (data/<COMP>/review.html)
	$(RUN) relabel $(CFG) $(ARGS)

infer: setup ## predict the test set with EXP's folds and write a validated submission
	$(RUN) infer $(CFG) $(ARGS)

oof-tta: setup ## score every TTA view on each fold's own validation images (runs/<exp>/oof_tta/)
	$(RUN) oof-tta $(CFG) $(ARGS)

ensemble: setup ## fit blend weights over RUNS='runs/a runs/b' (and TTA views) on OOF
	$(RUN) ensemble $(CFG) --runs $(RUNS) $(ARGS)

submit: setup ## submit FILE (default: the newest submission CSV) to Kaggle, MSG optional, and wait for the score
	$(RUN) submit $(if $(FILE),$(FILE),$$(ls -t submissions/*.csv | grep -v ledger.csv | head -n 1)) \
		$(if $(MSG),-m "$(MSG)") $(CFG) --wait

package: setup ## code competitions: EXP's runs as a Kaggle dataset in package/<name>/ (ARGS="package.owner=you")
	$(RUN) package $(CFG) $(ARGS)

kernel: setup ## code competitions: render the internet-off notebook and dry-run it locally (kernels/<name>/)
	$(RUN) kernel $(CFG) --dry-run $(ARGS)

lb: setup ## sync the ledger with Kaggle and show CV vs leaderboard
	$(RUN) lb $(CFG)

bench: setup ## measure loader / inference / training speed (bench/results.md)
	$(RUN) bench

clean: ## remove run outputs and caches (keeps data/ and the venv)
	rm -rf runs predictions cache bench .pytest_cache
