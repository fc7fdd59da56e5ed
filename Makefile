# Every target creates .venv when it is missing. Torch comes first, pinned to a build whose torchvision imports.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= demo

.PHONY: venv demo test test-all test-gpu bench bench-gpu clean

$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e ".[test,demo,plot]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python run_search.py --config $(CONFIG)

test: venv
	$(BIN)/python -m pytest -q

test-all: venv
	$(BIN)/python -m pytest -q -m ""

test-gpu: venv
	$(BIN)/python -m pytest -q -m gpu tests/test_gpu.py

bench-gpu: venv
	$(BIN)/python bench/bench_gpu.py

bench: venv
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python bench/bench_speed.py

clean:
	rm -rf $(VENV) *.egg-info
