# Two commands for a new user: `make speedrun` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Tests that need several devices see 8 fake CPU devices.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 TF_CPP_MIN_LOG_LEVEL=3
WORKDIR ?= runs/speedrun

.PHONY: install browser test test-slow speedrun bench notebooks lint format clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The chat page's test drives Debian's chromium through chromedriver; installed when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; }

test: lint browser
	$(TEST_ENV) $(BIN)/python -m pytest -q

test-slow: install
	$(TEST_ENV) $(BIN)/python -m pytest -q -m slow

speedrun: install
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/lm speedrun --workdir=$(WORKDIR)

bench: install
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python -m benchmarks.run --out=BENCHMARKS.md

# Runs every notebook top to bottom (nbclient, as make test does) and saves it with its outputs.
notebooks: install
	TF_CPP_MIN_LOG_LEVEL=3 $(BIN)/python notebooks/execute.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
