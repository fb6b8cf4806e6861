# make demo | make test | make bench -- each sets up .venv first (Python 3.8-3.11 and g++).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mxlamb-built

.PHONY: install demo test bench clean

$(STAMP): setup.py setup.cfg pyproject.toml requirements.txt $(wildcard src/operators/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	# --no-build-isolation: build against the mxnet just installed, not a second copy.
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/train_mlp.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf build mxlamb/libmxlamb.so *.egg-info
