# The README's two commands: `make demo` and `make test`.
.PHONY: setup setup-test demo test bench clean

setup:
	bash scripts/setup.sh

setup-test:
	MEMLAB_EXTRAS=test bash scripts/setup.sh

demo: setup
	.venv/bin/memlab demo

test: setup-test
	.venv/bin/python -m pytest -q

bench: setup-test
	.venv/bin/python benchmarks/telemetry_overhead.py

clean:
	rm -rf memlab-runs .pytest_cache
