# The commands a newcomer needs. Everything installs into .venv from PyPI; nothing else is assumed
# but Python >= 3.11 and (for the Redis tests) a Redis on 127.0.0.1:6379.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CERTS  ?= certs
CONFIG ?= config/examples/expense.yaml
# `make run` listens on 8443 (broker, BROKER_LISTEN), 9090 (admin, BROKER_ADMIN_LISTEN), and these two:
BACKEND_LISTEN ?= 127.0.0.1:9443
MCP_LISTEN     ?= 127.0.0.1:9444
IDP_LISTEN     ?= 127.0.0.1:9445

.PHONY: install certs run demo test test-fast bench lint check wheel clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

certs: install $(CERTS)/ca.pem

$(CERTS)/ca.pem:
	$(BIN)/broker certs --out $(CERTS)

## run: the demo expense backend and the broker on the embedded defaults (memory state, var/audit.jsonl).
## A port taken? e.g. make run BROKER_LISTEN=127.0.0.1:18443 BROKER_PUBLIC_URL=https://localhost:18443
run: certs
	$(BIN)/python -m broker.dev.demo.stack --config $(CONFIG) --certs $(CERTS) \
		--backend-listen $(BACKEND_LISTEN) --mcp-listen $(MCP_LISTEN) --idp-listen $(IDP_LISTEN)

## demo: an agent walks the expense scenario against a running `make run`
demo: certs
	$(BIN)/python -m broker.dev.demo.agent --certs $(CERTS) --broker $${BROKER_PUBLIC_URL:-https://localhost:8443}

check: install
	$(BIN)/broker check -c $(CONFIG)

test: install
	$(BIN)/pytest -q

## bench: requests/s, p50/p99 and the server's CPU µs per request (pinned to one core, unpinned beside) for backend
## direct, a bare aiohttp forwarder and the broker, per-stage costs, and
## what `broker connect` adds to a call; writes var/bench.json
bench: install
	$(BIN)/python -m broker.dev.bench --unpinned-too --rounds 3 --duration 6 --out var/bench.json
	$(BIN)/python -m broker.dev.bench.micro --out var/bench.json
	$(BIN)/python -m broker.dev.bench.connector --out var/bench.json

## soak: 10 minutes of mixed traffic at half the measured capacity; checks every answer, the broker's RSS and
## the audit log; writes var/soak.json (e.g. make soak SOAK_ARGS="--duration 120 --state redis --rate 200")
.PHONY: soak
soak: install
	$(BIN)/python -m broker.dev.bench.soak --out var/soak.json $(SOAK_ARGS)

## wheel: dist/broker-<version>-py3-none-any.whl, the package the systemd steps install (deploy/README.md).
## `pip wheel --no-deps`: the project alone (pip fetches the build backend, setuptools, into an isolated env)
wheel: install
	$(BIN)/pip wheel --no-deps --wheel-dir dist .

lint: install
	$(BIN)/ruff check broker tests
	$(BIN)/ruff format --check broker tests
	$(BIN)/mypy broker

clean:
	rm -rf var dist build .pytest_cache .ruff_cache .mypy_cache
