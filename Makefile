# Entry points. `make run` serves on the embedded SQLite default; `make test` runs the suite on PostgreSQL and SQLite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FLASK := $(BIN)/flask --app wsgi
HOST ?= 127.0.0.1
PORT ?= 8000
USER_ID ?= dev-user
COUNT ?= 100

.PHONY: help venv run test lint migrate seed token clean bench

help:
	@echo "make run | test | lint | migrate | seed [USER_ID= COUNT=] | token [USER_ID=] | clean"

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

run: venv migrate
	@echo
	@echo "Try it:"
	@echo "  curl -H 'Authorization: Bearer $$($(FLASK) token --user $(USER_ID) --ttl 86400)' http://$(HOST):$(PORT)/api/$(USER_ID)/tasks"
	@echo "  API docs: http://$(HOST):$(PORT)/docs"
	@echo
	$(BIN)/gunicorn -c gunicorn.conf.py --bind $(HOST):$(PORT) wsgi:app

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .

migrate: venv
	$(FLASK) db upgrade

seed: venv migrate
	$(FLASK) seed --user $(USER_ID) --count $(COUNT)

token: venv
	@$(FLASK) token --user $(USER_ID)

# Load benchmark over HTTP with wrk (bench/README.md), e.g. make bench BENCH_ARGS="--quick --compare-seed-stack"
bench: venv
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) instance .pytest_cache .ruff_cache
