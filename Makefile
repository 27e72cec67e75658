# detr_lite — every target creates/refreshes the virtual environment it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.py))
# Kernels draw figures with the inline backend (MPLBACKEND=Agg would silently drop every figure).
NB_ENV := MPLBACKEND=module://matplotlib_inline.backend_inline

.PHONY: venv demo train train-deformable deformable-study test lint unit nbval sync-check lab notebooks notebook-headers bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

## First command (about a minute on 2 CPU cores once installed): evaluate both shipped models on the
## bundled val split (AP tables side by side) and draw predictions for a few val images with DETR's
## attention maps / Deformable DETR's sampling points (runs/demo/). Options: make demo DEMO_ARGS="--images 5"
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m detr_lite.demo $(DEMO_ARGS)

## Main job: pretrain the toy backbone, train the toy DETR on the bundled data, evaluate it (COCO AP table).
## Quick run: make train PRETRAIN_ARGS="--epochs 1" TRAIN_ARGS="--epochs 2"
## (any python -m detr_lite.pretrain / python -m detr_lite.train option; output dir: TRAIN_OUT=...)
TRAIN_OUT ?= runs/detr-shapes
TRAIN_ARGS ?=
PRETRAIN_ARGS ?=
train: $(STAMP)
	$(PY) -m detr_lite.pretrain --config detr-shapes --output $(TRAIN_OUT)/backbone.pt $(PRETRAIN_ARGS)
	$(PY) -m detr_lite.train --config detr-shapes --backbone-weights $(TRAIN_OUT)/backbone.pt --output $(TRAIN_OUT) $(TRAIN_ARGS)
	$(PY) -m detr_lite.evaluate --checkpoint $(TRAIN_OUT)/checkpoint.pt --json $(TRAIN_OUT)/eval.json --no-progress
	@echo "plots: $(TRAIN_OUT)/loss.png  checkpoint: $(TRAIN_OUT)/checkpoint.pt  metrics: $(TRAIN_OUT)/eval.json"

## The toy Deformable DETR on the same pretext backbone (pretrained first if $(TRAIN_OUT)/backbone.pt
## is missing), then its COCO AP table. Quick run: make train-deformable TRAIN_ARGS="--epochs 1"
## (continue a stopped run: make train-deformable TRAIN_ARGS=--resume)
DEFORMABLE_OUT ?= runs/deformable-shapes
train-deformable: $(STAMP)
	test -f $(TRAIN_OUT)/backbone.pt || $(PY) -m detr_lite.pretrain --config detr-shapes --output $(TRAIN_OUT)/backbone.pt $(PRETRAIN_ARGS)
	$(PY) -m detr_lite.train --config deformable-shapes --backbone-weights $(TRAIN_OUT)/backbone.pt --output $(DEFORMABLE_OUT) $(TRAIN_ARGS)
	$(PY) -m detr_lite.evaluate --checkpoint $(DEFORMABLE_OUT)/checkpoint.pt --json $(DEFORMABLE_OUT)/eval.json --no-progress
	@echo "plots: $(DEFORMABLE_OUT)/loss.png  checkpoint: $(DEFORMABLE_OUT)/checkpoint.pt  metrics: $(DEFORMABLE_OUT)/eval.json"

## The convergence study of notebook 08: DETR and the three Deformable variants from the same
## pretext backbone for STUDY_EPOCHS epochs each (evaluated every epoch), logs copied to
## data/checkpoints/study/. DETR's constant-lr preset makes its first 30 epochs those of make train.
STUDY_EPOCHS ?= 30
STUDY_OUT ?= runs/study
STUDY_RUNS := detr:detr-shapes deformable:deformable-shapes deformable_refine:deformable-shapes-refine \
  deformable_refine_two_stage:deformable-shapes-refine-two-stage
deformable-study: $(STAMP)
	test -f $(TRAIN_OUT)/backbone.pt || $(PY) -m detr_lite.pretrain --config detr-shapes --output $(TRAIN_OUT)/backbone.pt $(PRETRAIN_ARGS)
	mkdir -p data/checkpoints/study
	for run in $(STUDY_RUNS); do name=$${run%%:*}; cfg=$${run#*:}; \
	  $(PY) -m detr_lite.train --config $$cfg --backbone-weights $(TRAIN_OUT)/backbone.pt --output $(STUDY_OUT)/$$name \
	    --epochs $(STUDY_EPOCHS) --eval-every 1 --no-progress $(TRAIN_ARGS) || exit 1; \
	  cp $(STUDY_OUT)/$$name/log.jsonl data/checkpoints/study/$${name}_log.jsonl; done

## Full test suite: lint, unit/parity/CLI tests, notebook pairing check, every notebook under nbval.
test: $(STAMP) lint sync-check unit nbval

lint: $(STAMP)
	$(PY) -m ruff check .

## All pytest tests; the quick inner loop skips the end-to-end runs: make unit PYTEST_ARGS='-m "not slow"'
PYTEST_ARGS ?=
unit: $(STAMP)
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

## Every notebooks/NN_*.py has an executed, cell-for-cell identical notebooks/NN_*.ipynb (and vice versa).
sync-check: $(STAMP)
	$(PY) tests/check_notebook_sync.py

## Re-run every executed notebook; cells marked `# NBVAL_CHECK_OUTPUT` must reproduce their stored output.
## (Skipped with a message only while notebooks/ holds no .ipynb at all; otherwise all of them run.)
nbval: $(STAMP)
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
	  echo "$(PY) -m pytest --nbval-lax ... notebooks"; \
	  $(NB_ENV) $(PY) -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=600 \
	    --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks -q -p no:cacheprovider; \
	else echo "nbval: notebooks/ has no executed .ipynb yet; nothing to run"; fi

## JupyterLab on notebooks/: token auth, no browser opened (works headless); open the printed URL
## with its token. A .py notebook opens as a notebook on double-click (.jupyter/lab/settings/overrides.d).
## More options: make lab LAB_ARGS="--ip=0.0.0.0 --port=8889"
LAB_ARGS ?=
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.d
lab: $(STAMP)
	mkdir -p $(LAB_SETTINGS) && cp .jupyter/lab/settings/overrides.d/detr_lite.json $(LAB_SETTINGS)/
	$(VENV)/bin/jupyter lab --no-browser --notebook-dir=notebooks \
	  $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

## Re-execute every notebook from its .py source and refresh the paired .ipynb, then rewrite the
## .py header from it as JupyterLab's jupytext writes it (so opening a notebook in the lab changes nothing).
## (One notebook: make notebooks NOTEBOOKS=notebooks/07_deformable_attention.py)
notebooks: $(STAMP)
	for nb in $(NOTEBOOKS); do \
	  $(NB_ENV) $(VENV)/bin/jupytext --to ipynb --execute --set-kernel python3 "$$nb" || exit 1; \
	  $(VENV)/bin/jupytext --sync --set-kernel python3 "$${nb%.py}.ipynb" || exit 1; done
	$(PY) tests/check_notebook_sync.py $(NOTEBOOKS)

## Only the headers of both halves of each pair, without re-executing (outputs are kept).
notebook-headers: $(STAMP)
	for nb in $(NOTEBOOKS); do $(VENV)/bin/jupytext --sync --set-kernel python3 "$$nb" || exit 1; done

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	for b in benchmarks/bench_*.py; do $(PY) "$$b" || exit 1; done

clean-venv:
	rm -rf $(VENV)
