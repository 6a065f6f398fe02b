# medfm: the two commands a newcomer types are `make demo` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
BACKBONE ?= dinov2
DATASET  ?= demo
HEAD     ?= linear
ARGS     ?=
# The synthetic demo set may run on random weights (announced loudly); real datasets need the real ones.
ifeq ($(DATASET),demo)
WEIGHTS  ?= auto
else
WEIGHTS  ?= default
endif
DEMO_OUTPUT := outputs/demo
# `make paper`: the study's grid. DATA holds one folder per dataset in its released layout.
STUDY_BACKBONES ?= deit dino resnet152 sam seem dinov2 openclip blip
STUDY_DATASETS  ?= aptos2019 isic2019 ddsm chexpert
DATA            ?= data
PAPER_OUTPUT    ?= outputs/paper
PROTOCOL        ?= study
PAPER_EPOCHS    ?= 100
EXTRACT_ARGS    ?=
PROBE_ARGS      ?=
FINETUNE_ARGS   ?=
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-fast lint extract probe finetune bench report paper

$(PY):
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'

install: $(PY)

# A tour of the whole job in minutes: extract two backbones on the synthetic demo set, train linear
# probes from the caches, print the report. Weights are the official ones when present, else random (said loudly).
# It keeps its caches, runs and ledger in outputs/demo, apart from your own experiments.
demo: $(PY)
	@export MEDFM_OUTPUT=$(DEMO_OUTPUT); for b in deit dinov2; do \
	  $(BIN)/extract run --backbone $$b --dataset demo --weights auto --image-size 112 --batch-size 32 || exit 1; \
	  $(BIN)/probe run --head linear --backbone $$b --dataset demo --epochs 30 --standardize || exit 1; \
	done
	MEDFM_OUTPUT=$(DEMO_OUTPUT) $(BIN)/probe report --dataset demo

test: $(PY)
	$(BIN)/pytest

# The inner loop: everything but the tests that start subprocesses (torchrun, killed runs, the installed commands).
test-fast: $(PY)
	$(BIN)/pytest -m "not slow"

lint: $(PY)
	$(BIN)/ruff check .

extract: $(PY)
	$(BIN)/extract run --backbone $(BACKBONE) --dataset $(DATASET) --weights $(WEIGHTS) $(ARGS)

probe: $(PY)
	$(BIN)/probe run --head $(HEAD) --backbone $(BACKBONE) --dataset $(DATASET) $(ARGS)

finetune: $(PY)
	$(BIN)/finetune run --head $(HEAD) --backbone $(BACKBONE) --dataset $(DATASET) --weights $(WEIGHTS) $(ARGS)

report: $(PY)
	$(BIN)/probe report $(ARGS)

# The whole study (docs/protocol.md): every backbone x dataset in the four scenarios (frozen/unfrozen x
# linear/DeiT head) with its inputs (224 px, bilinear resize, the study's normalisation constants, grayscale DDSM and
# CheXpert as one channel), then its table and figure. Official weights from MEDFM_WEIGHTS_DIR; results in outputs/paper.
# PROTOCOL=study (default) runs every cell as the official code did (--protocol study): frozen linear heads on
# PAPER_EPOCHS augmented views of the train split (one view per epoch, as the study's frozen backbone sees a fresh
# augmentation each epoch), frozen DeiT heads end to end on live augmented images (token views would take
# PAPER_EPOCHS x the disk). PROTOCOL=fast trains the frozen cells on one cached eval view: far cheaper, not the study's.
# Rerunning continues where it stopped: finished caches and runs are reused and an interrupted finetune resumes.
# EXTRACT_ARGS, PROBE_ARGS and FINETUNE_ARGS reach each stage, e.g. FINETUNE_ARGS="--device cuda:1".
paper: $(PY)
	@case "$(PROTOCOL)" in study|fast) ;; *) echo "error: PROTOCOL must be study or fast, got '$(PROTOCOL)'" >&2; exit 2;; esac; \
	export MEDFM_OUTPUT=$(PAPER_OUTPUT); for d in $(STUDY_DATASETS); do \
	  inputs="--norm study --interpolation bilinear"; case $$d in ddsm|chexpert) inputs="$$inputs --in-chans 1";; esac; \
	  for b in $(STUDY_BACKBONES); do \
	    run="--backbone $$b --dataset $$d"; live="$$run --root $(DATA)/$$d $$inputs"; \
	    if [ "$(PROTOCOL)" = study ]; then \
	      $(BIN)/extract run $$live --protocol study --views $(PAPER_EPOCHS) --augment study --no-tokens $(EXTRACT_ARGS) || exit 1; \
	      $(BIN)/probe run --head linear $$run --protocol study --epochs $(PAPER_EPOCHS) $(PROBE_ARGS) || exit 1; \
	      $(BIN)/finetune run --head deit --freeze all $$live --protocol study --epochs $(PAPER_EPOCHS) --resume $(FINETUNE_ARGS) || exit 1; \
	      for h in linear deit; do \
	        $(BIN)/finetune run --head $$h $$live --protocol study --epochs $(PAPER_EPOCHS) --resume $(FINETUNE_ARGS) || exit 1; \
	      done; \
	    else \
	      $(BIN)/extract run $$live $(EXTRACT_ARGS) || exit 1; \
	      for h in linear deit; do \
	        $(BIN)/probe run --head $$h $$run --epochs $(PAPER_EPOCHS) $(PROBE_ARGS) || exit 1; \
	        $(BIN)/finetune run --head $$h $$live --epochs $(PAPER_EPOCHS) --resume $(FINETUNE_ARGS) || exit 1; \
	      done; \
	    fi; \
	  done; \
	done; \
	$(BIN)/probe report

# Ratios measured side by side (pipeline vs bare forward, cache vs online, batched sweep, HDF5 vs memmap reads,
# peak memory); each run appends to outputs/bench/summary.json. `make bench ARGS="reads sweep"` runs a subset.
bench: $(PY)
	$(PY) -m bench $(ARGS)
