# The two commands (README): `make run` and `make test`. Both install what they need.
SHELL := /bin/bash
VENV := .venv/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run test test-unit evaluate bench bench-full setup clean

setup:
	scripts/bootstrap.sh

## The main job end to end on embedded defaults (MovieLens-100k, SQLite, file offline store)
run: setup
	$(VENV)/qarm run

## The whole test suite: unit + integration (real feast CLI, Redis, PostgreSQL) + quick bench
test:
	scripts/bootstrap.sh --system
	$(VENV)/python -m pytest -q tests

test-unit: setup
	$(VENV)/python -m pytest -q tests/unit

## The ranking evaluation of the demo repo, MovieLens-100k (reports/movielens-100k.{md,json,png})
evaluate: setup
	$(VENV)/qarm evaluate --repo feature_repo

bench: setup
	$(VENV)/python -m benchmarks --quick

bench-full: setup
	$(VENV)/python -m benchmarks

clean:
	rm -rf artifacts .pytest_cache
