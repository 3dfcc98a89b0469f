# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export SOVEREIGN_TEST_REDIS_URL ?= redis://127.0.0.1:6379

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed setup.cfg
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

## make run: create .venv, install, start the demo (simulated provider + gateway + demo key).
run: $(VENV)/.installed
	$(BIN)/sovereign demo

## make test: dev dependencies, a reachable Redis, the whole suite.
test: $(VENV)/.installed-dev
	.ci/ensure-redis
	$(BIN)/python -m pytest -q

## make bench: the benchmark suite (see bench/README.md); writes bench/results/.
bench: $(VENV)/.installed-dev
	.ci/ensure-redis
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .redis-test build *.egg-info
