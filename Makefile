# Set-up and checks. `make demo` and `make test` work on a fresh machine: both create .venv first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install browser demo stop test test-1100 lint bench bench-dag bench-wait clean e2e-celery

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

# Debian's Chromium for the browser tests (Playwright drives it; it never downloads a browser).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# PROVIDER=anthropic or PROVIDER=azure_openai: the same demo through that batch API (offline by default).
demo: install
	PROVIDER="$(PROVIDER)" $(BIN)/python scripts/demo.py

# Stop the Airflow processes and local batch server that `make demo` left running.
stop:
	test ! -x $(BIN)/python || $(BIN)/python scripts/demo.py stop

test: install browser lint
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25

# The shard-grouping case at full scale: 1,100 one-request batches in 64 task instances (5 min; not in `make test`).
test-1100: install
	OPENAI_BATCH_TEST_SHARDS=1100 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_shard_groups.py -k one_request

# The pipeline on Postgres + CeleryExecutor (Redis broker) with two workers (also part of `make test`).
e2e-celery: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_e2e_celery.py

# Not part of `make test`: build and merge against a naive pandas script on generated 200k/1M rows.
bench: install
	$(BIN)/python scripts/bench.py

# A million rows through the whole DAG (dag.test against the local server): 20 shards, small XCom.
bench-dag: install
	$(BIN)/python scripts/bench_dag.py

# 200 and 1,000 batches waiting in one real triggerer (poll 5 s): shared async client vs one per trigger.
bench-wait: install
	$(BIN)/python scripts/bench_wait.py

lint: install
	$(BIN)/ruff check .

clean: stop
	rm -rf $(VENV) airflow_home var output
