# The two set-up commands of the README: `make run` and `make test`. Everything else is plumbing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: run test lint setup clean chromium

setup: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Serve function_app.py on 127.0.0.1:7071 against Azurite (started if none is running).
run: setup
	$(BIN)/durable start

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The dashboard's browser test drives the distribution's Chromium (never a downloaded browser).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The Python 3.13 + azure-functions 2.x environment first: tests/test_indexing.py runs the real
# Python worker's indexing from it. The other platform combinations run in CI (.ci/run).
test: lint chromium
	.ci/matrix --smoke py3.13-af2
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
