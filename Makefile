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
# The study's lists live in one place, common/study.py.
STUDY_BACKBONES ?= $(shell $(PY) -m common.study backbones)
STUDY_DATASETS  ?= $(shell $(PY) -m common.study datasets)
DATA            ?= data
PAPER_OUTPUT    ?= outputs/paper
PROTOCOL        ?= study
PAPER_EPOCHS    ?= 100
EXTRACT_ARGS    ?=
PROBE_ARGS      ?=
FINETUNE_ARGS   ?=
EXECUTOR        ?= local
GRID_ARGS       ?=
# `make transfer`: train-here, test-there pairs (docs/transfer.md), TARGET:SOURCE, each folder under DATA.
TRANSFER_PAIRS  ?= ham10000:isic2019 idrid:aptos2019 messidor2:aptos2019 chestxray14:chexpert cbis-ddsm:ddsm
TRANSFER_OUTPUT ?= outputs/transfer
export HF_HUB_OFFLINE ?= 1

.PHONY: install test-tools demo test test-fast lint extract probe finetune bench bench-readme gpu-check report paper transfer

$(PY):
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'

install: $(PY)

# The report's page and tables are tested in a real headless browser and LaTeX (tests/report/test_html.py, test_latex.py),
# which skip without them: as root, this installs Debian's chromium, texlive-latex-base and texlive-latex-recommended
# (booktabs) when missing, about a minute. .ci/run does: with CI set, those tests fail rather than skip without them.
test-tools:
	@if command -v chromium >/dev/null && command -v pdflatex >/dev/null && kpsewhich booktabs.sty >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then echo "error: make test-tools installs Debian packages: run it as root (sudo make test-tools)" >&2; exit 2; fi; \
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	  chromium texlive-latex-base texlive-latex-recommended

# A tour of the whole job in minutes: extract two backbones on the synthetic demo set, train linear
# probes from the caches, print the report. Weights are the official ones when present, else random (said loudly).
# It keeps its caches, runs and ledger in outputs/demo, apart from your own experiments.
demo: $(PY)
	@export MEDFM_OUTPUT=$(DEMO_OUTPUT); for b in deit dinov2; do \
	  $(BIN)/extract run --backbone $$b --dataset demo --weights auto --image-size 112 --batch-size 32 || exit 1; \
	  $(BIN)/probe run --head linear --backbone $$b --dataset demo || exit 1; \
	done
	MEDFM_OUTPUT=$(DEMO_OUTPUT) $(BIN)/probe report --dataset demo

# The tests run on one torch thread each, so pytest-xdist spreads them over a process per core; the SLURM tests share the
# one test cluster and stay on one process (their xdist_group). `pytest -n 0 ...` runs a file in-process.
XDIST = -n auto --dist loadgroup

test: $(PY)
	$(BIN)/pytest $(XDIST)

# The inner loop: everything but the tests that start subprocesses (torchrun, killed runs, the installed commands).
test-fast: $(PY)
	$(BIN)/pytest $(XDIST) -m "not slow"

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

# The whole study (docs/protocol.md) as a grid of jobs (docs/grid.md): every backbone x dataset in the four scenarios
# (frozen/unfrozen x linear/DeiT head) with its inputs (224 px, bilinear resize, the study's normalisation constants,
# grayscale DDSM and CheXpert as one channel), then its table and figure. Official weights from MEDFM_WEIGHTS_DIR;
# results in outputs/paper. PROTOCOL=study (default) runs every cell as the official code did (--protocol study):
# frozen linear heads on PAPER_EPOCHS augmented views of the train split, frozen DeiT heads end to end on live
# augmented images. PROTOCOL=medfm trains the frozen cells on one cached eval view under medfm's own rules: far cheaper, not the study's.
# EXECUTOR=local (default) runs the jobs on this machine, one per free GPU; EXECUTOR=slurm submits them to SLURM
# (GRID_ARGS reaches `grid run`, e.g. GRID_ARGS="--partition gpu --account lab"). Rerunning plans only what is
# missing: finished caches and runs are reused and an interrupted finetune resumes.
# EXTRACT_ARGS, PROBE_ARGS and FINETUNE_ARGS reach each stage, e.g. FINETUNE_ARGS="--workers 8".
paper: $(PY)
	MEDFM_OUTPUT=$(PAPER_OUTPUT) $(BIN)/grid run --executor $(EXECUTOR) --protocol $(PROTOCOL) --backbones "$(STUDY_BACKBONES)" \
	  --datasets "$(STUDY_DATASETS)" --data $(DATA) --epochs $(PAPER_EPOCHS) --extract-args "$(EXTRACT_ARGS)" \
	  --probe-args "$(PROBE_ARGS)" --finetune-args "$(FINETUNE_ARGS)" $(GRID_ARGS)
	@if [ "$(EXECUTOR)" = local ]; then MEDFM_OUTPUT=$(PAPER_OUTPUT) $(BIN)/probe report; else \
	  echo "submitted: watch with 'MEDFM_OUTPUT=$(PAPER_OUTPUT) $(BIN)/grid status'; when every cell is done, 'MEDFM_OUTPUT=$(PAPER_OUTPUT) $(BIN)/probe report'"; fi

# Train here, test there (docs/transfer.md): for each TARGET:SOURCE pair and study backbone, the frozen scenarios
# (linear and DeiT heads from the cache) trained on SOURCE, then their best configuration scored on TARGET's test split
# through the label map. Both datasets are fed the same way (the backbone's own normalisation, bilinear resize, one
# channel for the grayscale pairs) so one head reads both caches. Classes a map leaves out are dropped and reported
# (--allow-unmapped), never silently. Results in outputs/transfer; the table is `probe report`'s transfer table.
transfer: $(PY)
	@export MEDFM_OUTPUT=$(TRANSFER_OUTPUT); for pair in $(TRANSFER_PAIRS); do \
	  target=$${pair%%:*}; source=$${pair##*:}; inputs="--norm model --interpolation bilinear"; \
	  case $$source in ddsm|chexpert) inputs="$$inputs --in-chans 1";; esac; \
	  for b in $(STUDY_BACKBONES); do \
	    for d in $$source $$target; do \
	      $(BIN)/extract run --backbone $$b --dataset $$d --root $(DATA)/$$d $$inputs $(EXTRACT_ARGS) || exit 1; \
	    done; \
	    $(BIN)/probe sweep --head linear,deit --backbone $$b --dataset $$source --epochs $(PAPER_EPOCHS) $(PROBE_ARGS) || exit 1; \
	    for s in frozen-linear frozen-deit; do \
	      $(BIN)/probe eval --backbone $$b --dataset $$source --scenario $$s --on $$target --allow-unmapped || exit 1; \
	    done; \
	  done; \
	done; \
	$(BIN)/probe report --evaluations transfer

# Ratios measured side by side (pipeline vs bare forward, cache vs online, batched sweep, HDF5 vs memmap reads,
# peak memory); each run appends to outputs/bench/summary.json. `make bench ARGS="reads sweep"` runs a subset;
# `make bench ARGS=--smoke` runs each one's code path at tiny sizes in seconds, recording nothing (the tests do too).
bench: $(PY)
	$(PY) -m bench $(ARGS)

# The README's Performance table from the latest figures of each benchmark in outputs/bench/summary.json (kept in
# bench/figures.json, each with its machine and date); `python -m bench.readme --check` says whether the README shows them.
bench-readme: $(PY)
	$(PY) -m bench.readme --update

# What a machine with a GPU runs first (under 5 minutes): extraction vs bare forward (ViT-B, ResNet152, AMP), a 1-GPU
# torchrun extraction, DeiT heads side by side in a probe sweep, an fp16 finetune killed and resumed. Refuses without CUDA.
gpu-check: $(PY)
	$(PY) -m bench.gpu_check $(ARGS)
