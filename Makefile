# The two set-up commands of the README. Both create .venv if missing, install what is missing, and are
# safe to re-run (pip skips what is already installed; the stamp file skips pip when nothing changed).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ufarm-installed
# pins for this machine's on-disk PyTorch wheels; other machines may override (make demo TORCH_PINS=)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/ufarm demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python scripts/bench_farm.py

clean:
	rm -rf runs .pytest_cache
