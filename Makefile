# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export SOVEREIGN_TEST_REDIS_URL ?= redis://127.0.0.1:6379

.PHONY: run lint test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The demo extra brings the `openai` package the demo's Python snippet uses.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed setup.cfg
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

## make run: create .venv, install, start the demo (simulated provider + gateway + demo key).
## Other ports: make run PORT=8081 UPSTREAM_PORT=9101; any other demo flags: make run ARGS='--host 0.0.0.0'.
PORT ?= 8080
UPSTREAM_PORT ?= 9100
ARGS ?=
run: $(VENV)/.installed
	$(BIN)/sovereign demo --port $(PORT) --upstream-port $(UPSTREAM_PORT) $(ARGS)

## make lint: ruff (pyflakes, pycodestyle, bugbear) and mypy (proxy, middleware); config in pyproject.toml.
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check proxy middleware tests bench
	$(BIN)/mypy

## make test: lint first, then dev dependencies, a reachable Redis, Chromium for the console tests, the whole suite.
test: lint
	.ci/ensure-redis
	.ci/ensure-node-deps
	.ci/ensure-chromium
	$(BIN)/python -m pytest -q

## make bench: the benchmark suite (see bench/README.md); writes bench/results/.
bench: $(VENV)/.installed-dev
	.ci/ensure-redis
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .redis-test build *.egg-info
