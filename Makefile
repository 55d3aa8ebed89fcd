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

$(BIN)/muster: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

.PHONY: install
install: $(BIN)/muster ## Create .venv and install Muster with its dev tools

.PHONY: run
run: install ## Run a dev control plane with one local agent (embedded defaults)
	$(BIN)/muster dev

.PHONY: test
test: install ## Run the suite on embedded defaults, then the server tests on Postgres + Redis
	$(BIN)/pytest -n $(TEST_WORKERS)
	MUSTER_TEST_BACKEND=postgres $(BIN)/pytest -n $(TEST_WORKERS) tests/server tests/e2e tests/agent

.PHONY: lint
lint: install ## ruff (lint + format check) and mypy --strict on hand-written code
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

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
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench
