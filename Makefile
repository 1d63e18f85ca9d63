# l2s developer targets. `make install` then `make demo` is the README's first command.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-all lint demo toy-model clean

install:  ## virtualenv + CPU torch from this machine's disk + l2s with dev tools
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"

test:  ## the fast offline suite (what CI runs)
	$(BIN)/pytest

test-all:  ## include slow tests (GPU tests still skip without CUDA)
	$(BIN)/pytest -m "not gpu"

lint:
	$(BIN)/ruff check l2s tests examples

demo:  ## the main job on the embedded default: the toy model, offline
	$(BIN)/l2s steer "a circle to the left of a square" --out out/demo

toy-model:  ## retrain the shipped toy model (hours on a CPU; resumable)
	$(BIN)/python -m l2s.toy.train --out runs/toy --resume

clean:
	rm -rf out .pytest_cache .ruff_cache
