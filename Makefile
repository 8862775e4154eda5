# The two commands a new user needs:  `make run`  and  `make test`.
# Both create .venv from the lock when needed (scripts/bootstrap.sh).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo_data
OUTPUT_DIR ?= outputs
RUN_ARGS ?=
PYTEST_ARGS ?=

export PYTHONHASHSEED := 0
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONWARNINGS := ignore::FutureWarning,ignore::DeprecationWarning

.PHONY: venv run test test-fast lint format lock bench clean

venv:
	@bash scripts/bootstrap.sh

## Generate the demo data if needed and run the local pipeline on it.
run: venv
	@$(BIN)/solov2 demo-data $(DEMO_DIR) --if-missing
	$(BIN)/solov2 run --coco-dir $(DEMO_DIR) --output-dir $(OUTPUT_DIR) $(RUN_ARGS)

## The whole suite, e2e tests included (target: under 20 minutes on 2 cores).
test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not e2e and not slow" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Re-resolve requirements.in into requirements.lock (uv; never done at install time).
lock: venv
	$(BIN)/uv pip compile requirements.in --python-version 3.10 \
	  --python-platform x86_64-manylinux_2_28 --generate-hashes -o requirements.lock

bench: venv
	@for b in benchmarks/*.py; do [ "$$b" = benchmarks/__init__.py ] && continue; \
	  echo "== $$b"; $(BIN)/python $$b; done

clean:
	rm -rf $(OUTPUT_DIR) $(DEMO_DIR)
