# The README's two commands: `make demo` and `make test`.
.PHONY: setup setup-test demo test test-unit test-engine lint bench clean

setup:
	bash scripts/setup.sh

setup-test:
	MEMLAB_EXTRAS=test bash scripts/setup.sh

demo: setup
	.venv/bin/memlab demo

# lint first: it takes a second, the suite half an hour
test: setup-test lint
	.venv/bin/python -m pytest -q

# one folder each: tests/unit (minutes), tests/engine (the real runs: most of the half hour)
test-unit:
	.venv/bin/python -m pytest -q tests/unit

test-engine:
	.venv/bin/python -m pytest -q tests/engine

lint: setup-test
	.venv/bin/ruff check memlab tests scripts benchmarks notebooks

bench: setup-test
	.venv/bin/python benchmarks/telemetry_overhead.py

clean:
	rm -rf memlab-runs .pytest_cache
