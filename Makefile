# Two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The exact torch pair we test. On this project's CI machines pip takes both wheels from the
# local disk (no multi-GB download); elsewhere pip fetches them from PyPI.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test lint bench gpu-check clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH_PINS)
	touch $@

setup: $(BIN)/.installed
	@java -version >/dev/null 2>&1 || [ -x "$${JAVA_HOME:-/nonexistent}/bin/java" ] || echo "setup: no Java" \
	  "runtime (java on PATH or JAVA_HOME): the Spark test (pytest -m spark) will be skipped;" \
	  "install Java 17+, e.g. apt-get install openjdk-17-jre-headless" >&2

demo: setup
	$(BIN)/python -m pipeline demo --output demo-output

# Two pytest workers (pytest-xdist), a whole test file each at a time (--dist loadfile keeps a
# file's shared Ray, S3 server and clusters in one worker); each worker starts its own
# 2-CPU local Ray. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2

test: setup
	$(BIN)/ruff check pipeline tests
	$(BIN)/pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile tests

# The throughput benchmarks, each side by side in one run (bench/README.md). The large slides
# are generated into bench/data/ on first use (~1.3 GB, ~20 min); results: bench/results/.
bench: setup
	$(BIN)/python bench/tiling.py
	$(BIN)/python bench/encoder.py
	$(BIN)/python bench/end_to_end.py

# The prepared GPU check (bench/README.md "GPU check"): one command, under 8 minutes on one
# GPU; results to bench/results/gpu_check_<gpu>.json. Exits 2 where no GPU is visible.
gpu-check: setup
	$(BIN)/python bench/gpu_check.py

lint: setup
	$(BIN)/ruff check pipeline tests

clean:
	rm -rf demo-output .pytest_cache
