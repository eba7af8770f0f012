# The README's two commands: `make demo` and `make test`.
.PHONY: setup setup-test demo test test-unit test-engine lint bench peer clean

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

# DeepSpeed's own ZeRO-3 offload tests, stock and with memlab's switches, and the difference:
#   make peer DEEPSPEED_SRC=/path/to/a/DeepSpeed/checkout [PEER_ARGS='--switches "all;memascend.pool"']
peer: setup-test
	@test -n "$(DEEPSPEED_SRC)" || { echo "make peer: set DEEPSPEED_SRC to a DeepSpeed source checkout"; exit 2; }
	.venv/bin/python -m memlab.peer "$(DEEPSPEED_SRC)" $(PEER_ARGS)

clean:
	rm -rf memlab-runs .pytest_cache peer-out
