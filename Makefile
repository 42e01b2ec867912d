# usage-meter: the project's verbs. `make demo` runs it, `make test` tests it.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Lambda runs python3.13, and `sam build` needs that interpreter on PATH: take it from pyenv
# when it is there, otherwise from PATH.
PY313 ?= $(shell p=$$(pyenv prefix 3.13 2>/dev/null || pyenv prefix 3.13.0 2>/dev/null); \
                 if [ -n "$$p" ]; then echo $$p/bin/python3.13; else command -v python3.13; fi)
VENV := .venv
PY := $(VENV)/bin/python
CHECKOV_VENV := .venv-checkov
export SAM_CLI_TELEMETRY ?= 0
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
HOST_ARCH := $(shell [ "$$(uname -m)" = aarch64 ] && echo arm64 || echo x86_64)

.PHONY: help setup dev invoke demo test test-fast build validate lint openapi campaign admin bench clean .java .chromium

help: ## list the verbs
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed $(CHECKOV_VENV)/.installed node_modules/.installed .java .chromium ## install Python deps, SAM CLI, checkov, DynamoDB Local, Java and Chromium

$(VENV)/.installed: requirements-dev.txt layers/shared/requirements.txt
	@test -n "$(PY313)" || { echo "python3.13 is required (pyenv install 3.13)"; exit 1; }
	test -x $(PY) || $(PY313) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# checkov's own pins (boto3, pydantic...) clash with requirements-dev.txt: it gets a virtualenv of its own.
$(CHECKOV_VENV)/.installed: requirements-checkov.txt
	@test -n "$(PY313)" || { echo "python3.13 is required (pyenv install 3.13)"; exit 1; }
	@test -x $(CHECKOV_VENV)/bin/python || $(PY313) -m venv $(CHECKOV_VENV)
	@$(CHECKOV_VENV)/bin/python -m pip install --quiet -r requirements-checkov.txt
	@echo "checkov $$($(CHECKOV_VENV)/bin/checkov --version) installed in $(CHECKOV_VENV)"
	@touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

.java:
	@command -v java >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; }
	@java -version 2>&1 | head -1 >&2

# The browser tests (tests/browser) drive Debian's Chromium with Playwright; Playwright's own
# browser download is not used.
.chromium:
	@test -x /usr/bin/chromium || { echo "installing chromium (Debian package) for the browser tests" >&2; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@/usr/bin/chromium --version 2>/dev/null | head -1 >&2

dev: setup ## serve the API on :3000 in Lambda runtimes, no Docker; flags: make dev ARGS=--help
	PYTHONPATH=layers/shared:. $(PY) -m devtools.dev $(ARGS)

invoke: setup ## Docker-free `sam local invoke`: make invoke FN=FlushFunction EVENT=events/<file>.json
	PYTHONPATH=layers/shared:. $(PY) -m devtools.local_invoke $(FN) $(if $(EVENT),--event $(EVENT))

demo: setup ## build, start the local stack, record sample usage over HTTP, flush, print usage JSON
	PYTHONPATH=layers/shared:. $(PY) -m devtools.demo

test: setup ## the whole suite: unit, integration (DynamoDB Local), infrastructure, end-to-end
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup ## unit tests only
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

build: setup ## sam build for this machine's architecture, no Docker
	sam build --parameter-overrides Architecture=$(HOST_ARCH)

validate: setup ## lint the template offline
	sam validate --lint

lint: setup ## ruff and mypy
	ruff check . && ruff format --check . && mypy

openapi: setup ## regenerate openapi.json from the pydantic models (a unit test checks it for drift)
	PYTHONPATH=layers/shared $(PY) -m devtools.openapi

campaign: setup ## the randomized fault campaign (SEEDS=200): exits 1 if any unit is lost or doubled
	PYTHONPATH=layers/shared:. $(PY) -m tests.faults.campaign --seeds $(or $(SEEDS),200)

admin: setup ## operators' command on a deployed table, e.g. make admin ARGS="--table T quarantine list"
	PYTHONPATH=layers/shared $(PY) -m usage_meter.admin $(ARGS)

bench: setup ## issue 9's figures, old design (bc33e96) vs this tree, into the README; then micro benchmarks
	PYTHONPATH=layers/shared:. $(PY) -m benchmarks.compare $(ARGS)
	$(PY) -m pytest benchmarks --benchmark-only $(PYTEST_ARGS)

clean: ## remove build output and local data
	rm -rf .aws-sam .local .pytest_cache
