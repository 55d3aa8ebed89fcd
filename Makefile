# Muster's one task runner. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROTOS := $(wildcard proto/muster/v1/*.proto)
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# Installs are reproducible: every third-party package comes from requirements.lock, pinned
# and hash-checked; Muster itself is installed editable on top, with no dependency lookup
# and no build isolation (setuptools and wheel are in the lock too).
$(BIN)/muster: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

.PHONY: install
install: $(BIN)/muster ## Create .venv and install Muster with its dev tools, from requirements.lock

# `uv pip compile` keeps every pin the lock already has unless pyproject.toml no longer
# allows it; `make lock UPGRADE=1` moves every package to the newest release allowed.
# deploy/requirements.lock (the image's runtime set) is resolved inside the dev lock, so
# both pin the same versions.
LOCK := $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--generate-hashes --quiet --custom-compile-command "make lock" $(if $(UPGRADE),--upgrade)

.PHONY: lock
lock: install ## Refresh requirements.lock and deploy/requirements.lock from pyproject.toml
	$(LOCK) --extra dev --extra bench -o requirements.lock
	$(LOCK) -c requirements.lock -o deploy/requirements.lock

.PHONY: lock-check
lock-check: install ## Fail if the lockfiles do not match pyproject.toml
	@cp requirements.lock $(VENV)/lock-check.dev && cp deploy/requirements.lock $(VENV)/lock-check.runtime
	@$(LOCK) --extra dev --extra bench -o $(VENV)/lock-check.dev
	@$(LOCK) -c requirements.lock -o $(VENV)/lock-check.runtime
	@cmp -s requirements.lock $(VENV)/lock-check.dev && cmp -s deploy/requirements.lock $(VENV)/lock-check.runtime \
		|| (echo "requirements.lock is stale: run 'make lock' and commit" >&2; exit 1)

.PHONY: run
run: install ## Run a dev control plane with one local agent (embedded defaults)
	$(BIN)/muster dev

.PHONY: test
test: install ## Run the suite on embedded defaults, then the server tests on Postgres + Redis
	$(BIN)/pytest -n $(TEST_WORKERS)
	MUSTER_TEST_BACKEND=postgres $(BIN)/pytest -n $(TEST_WORKERS) tests/server tests/e2e tests/agent tests/console

.PHONY: check
check: lint ## Lint, then the fast tests (everything not marked slow) on embedded defaults: under two minutes
	$(BIN)/pytest -n $(TEST_WORKERS) -q -m "not slow"

.PHONY: lint
lint: install ## ruff (lint + format check) and mypy --strict on hand-written code
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy --strict examples/executor-plugin/src

.PHONY: fmt
fmt: install ## Format the code with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

.PHONY: wheels
wheels: install ## Build the wheels (whole, SDK, agent, server) into dist/ and install each part alone
	$(BIN)/python deploy/wheels/build.py --out dist --check

.PHONY: proto
proto: install ## Regenerate muster/v1 from proto/ (committed; never edit by hand)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -I proto \
		--python_out=. --pyi_out=. --grpc_python_out=. --mypy_grpc_out=. \
		$(PROTOS)

.PHONY: proto-check
proto-check: proto ## Fail if the committed generated code differs from proto/
	@git diff --exit-code -- muster/v1 || (echo "muster/v1 is stale: run 'make proto' and commit" >&2; exit 1)
	@test -z "$$(git status --porcelain -- muster/v1)" || (echo "untracked generated files in muster/v1" >&2; exit 1)

.PHONY: bench
bench: install ## Run the benchmarks (Postgres, Redis, RabbitMQ on this machine), write docs/benchmarks.md, print the targets
	$(BIN)/python -m bench
