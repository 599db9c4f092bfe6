# The two commands: `make demo` and `make test`. Each creates .venv when it is missing and
# installs the pinned requirements, then the project itself (editable, with its CLIs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: venv demo test test-multiprocess test-orbax-floor lint format fashion-mnist bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@# A venv without pip (its creation failed half-way) is made again.
	@$(BIN)/python -m pip --version > /dev/null 2>&1 || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } \
		|| { echo "$(PYTHON) -m venv failed; on Debian: apt-get install python3-venv" >&2; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q -e .
	@touch $(STAMP)

venv: $(STAMP)

# The embedded default data set: Debian's original Fashion-MNIST files.
fashion-mnist:
	@if [ -f $(FMNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
	  echo "Fashion-MNIST is not installed. Run: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"; \
	  echo "(make test skips the tests that need it; make demo needs it)"; \
	fi

demo: venv fashion-mnist
	$(BIN)/dnq-demo --workdir demo_out

# Two workers (pytest-xdist), each test file on one worker (its module fixtures built once);
# TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= 2
test: venv fashion-mnist
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not multiprocess" -n $(TEST_WORKERS) --dist loadfile tests

# Two jax.distributed processes on 127.0.0.1 against one process: the device path (under a
# minute on 2 idle cores), then the stream (85 s on 2 cores shared with a training run); the
# files are named so that pytest does not import the whole suite to select them.
test-multiprocess: venv fashion-mnist
	$(BIN)/python -m pytest -q -p no:cacheprovider -m multiprocess tests/test_multihost.py \
	  tests/test_stream_multihost.py

# The checkpoint fault tests again with the lowest orbax-checkpoint pyproject.toml allows
# (its own venv: the pinned requirements, then that version over them).
ORBAX_FLOOR := 0.11.17
FLOOR_VENV := $(VENV)/orbax-floor
test-orbax-floor: fashion-mnist
	@test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q -r requirements-dev.txt
	$(FLOOR_VENV)/bin/python -m pip install -q "orbax-checkpoint==$(ORBAX_FLOOR)"
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps -e .
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_faults.py \
	  -k "sigkill or sigterm or torn or marker or evaluate_cli_on"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: venv
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/input_speed.py

clean:
	rm -rf $(VENV) demo_out data_cache .pytest_cache
