# The commands a newcomer needs. Everything installs into .venv from PyPI; nothing else is assumed
# but Python >= 3.11 and (for the Redis tests) a Redis on 127.0.0.1:6379.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CERTS  ?= certs
CONFIG ?= config/examples/expense.yaml

.PHONY: install certs run demo test test-fast bench lint check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

certs: install $(CERTS)/ca.pem

$(CERTS)/ca.pem:
	$(BIN)/broker certs --out $(CERTS)

## run: the demo expense backend and the broker on the embedded defaults (memory state, var/audit.jsonl)
run: certs
	$(BIN)/python -m broker.dev.demo.stack --config $(CONFIG) --certs $(CERTS)

## demo: an agent walks the expense scenario against a running `make run`
demo: certs
	$(BIN)/python -m broker.dev.demo.agent --certs $(CERTS)

check: install
	$(BIN)/broker check -c $(CONFIG)

test: install
	$(BIN)/pytest -q

## bench: requests/s and p50/p99 for backend direct, a bare aiohttp forwarder and the broker; writes var/bench.json
bench: install
	$(BIN)/python -m broker.dev.bench --out var/bench.json
	$(BIN)/python -m broker.dev.bench.micro --out var/bench.json

## soak: 10 minutes of mixed traffic at half the measured capacity; checks every answer, the broker's RSS and
## the audit log; writes var/soak.json (e.g. make soak SOAK_ARGS="--duration 120 --state redis --rate 200")
.PHONY: soak
soak: install
	$(BIN)/python -m broker.dev.bench.soak --out var/soak.json $(SOAK_ARGS)

lint: install
	$(BIN)/ruff check broker tests
	$(BIN)/ruff format --check broker tests
	$(BIN)/mypy broker

clean:
	rm -rf var .pytest_cache .ruff_cache .mypy_cache
