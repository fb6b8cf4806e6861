# make demo | make test | make bench -- each sets up .venv first (Python 3.8-3.11 and g++).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mxlamb-built

.PHONY: install demo demo-mlp test test-unit test-integration test-system test-mxnet2 test-packaging bench peers-venv sanitize rss horovod clean

$(STAMP): setup.py setup.cfg pyproject.toml build_backend.py requirements.txt $(wildcard src/operators/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	# --no-build-isolation: build against the mxnet just installed, not a second copy.
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $@

install: $(STAMP)

# The main job: a tiny BERT pretrained (masked LM + next sentence) with mxlamb (float32 and
# 8-bit moments), MXNet's LAMB and Adam; loss curves in bert_out/loss_curves.png.
demo: $(STAMP)
	$(BIN)/python examples/bert_pretrain.py --out-dir bert_out

demo-mlp: $(STAMP)
	$(BIN)/python examples/train_mlp.py

# Horovod (optional extra): built from source against the venv's mxnet with gloo, about 2 min
# once (pip caches the wheel). gloo's CMake files need cmake 3.x (a pip-installed cmake 4.x
# rejects them), so `make test` adds it only where such a cmake is on the PATH; elsewhere
# tests/test_horovod.py is skipped, saying so.
HVD_STAMP := $(VENV)/.horovod-built
HOROVOD_BUILDABLE := $(shell cmake --version 2>/dev/null | awk 'NR == 1 && $$3 ~ /^3\./ {print "yes"}')
$(HVD_STAMP): $(STAMP)
	HOROVOD_WITH_MXNET=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 \
	HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 \
	$(BIN)/python -m pip install -q --no-build-isolation horovod==0.28.1
	touch $@

horovod: $(HVD_STAMP)
	$(BIN)/python -m pytest -q tests/test_horovod.py

# MXNet 2.0.0b1 in its own virtualenv: the operators built against its lib_api.h into
# build/mxnet2/ and loaded from there (MXLAMB_LIBRARY), mxlamb from this source tree.
MX2_VENV := .venv-mxnet2
MX2_LIB := build/mxnet2/libmxlamb.so
MX2_STAMP := $(MX2_VENV)/.mxlamb-built
$(MX2_STAMP): setup.py requirements-mxnet2.txt $(wildcard src/operators/*)
	test -x $(MX2_VENV)/bin/python || $(PYTHON) -m venv $(MX2_VENV)
	$(MX2_VENV)/bin/python -m pip install -q -r requirements-mxnet2.txt
	$(MX2_VENV)/bin/python -c "import setup; setup.compile_operator_library('$(MX2_LIB)', 'build/mxnet2/obj')" >/dev/null
	touch $@

# The whole suite on MXNet 1.9.1, then again on MXNet 2.0.0b1 beside the package as users get it
# (side by side: the packaging test mostly waits on pip; each one's output comes when it ends).
test: $(STAMP) $(if $(HOROVOD_BUILDABLE),$(HVD_STAMP)) $(MX2_STAMP)
	$(BIN)/python -m pytest -q --durations=15
	$(MAKE) --no-print-directory -j2 --output-sync=target test-mxnet2 test-packaging

# One tier of the 1.9.1 suite (pytest.ini's markers): unit (about a minute), integration, system.
test-unit test-integration test-system: test-%: $(STAMP)
	$(BIN)/python -m pytest -q -m $*

# tests/test_cuda.py drives the CUDA kernels through their C interface, without MXNet, and
# compile-checks the GPU binding against both MXNets' headers from whichever suite runs it:
# the 1.9.1 suite has run it already.
test-mxnet2: $(MX2_STAMP)
	MXLAMB_LIBRARY=$(CURDIR)/$(MX2_LIB) PYTHONPATH=$(CURDIR) $(MX2_VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=10 --ignore=tests/test_cuda.py

# python -m build (an sdist, then a wheel from it), installed into fresh virtualenvs holding
# mxnet 1.9.1 and 2.0.0b1 (which must stay), used from outside the source tree and from an
# unpacked sdist's root: tests/test_packaging.py, about two minutes.
test-packaging: $(STAMP)
	MXLAMB_PACKAGING_TESTS=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_packaging.py

# The peers bench_step.py compares with, in their own virtualenv (they need numpy 2, .venv has
# numpy<1.24): CPU-only torch from PyTorch's CPU index where it answers (else PyPI's torch),
# timm, jax[cpu], optax and Keras 3 (the JAX backend). Then bench_peers.py --check compares
# each with a float64 NumPy LAMB. Python 3.11 or newer (jax): PEERS_PYTHON=python3.11 to choose.
PEERS_VENV := .venv-peers
PEERS_PYTHON ?= $(PYTHON)
PEERS_STAMP := $(PEERS_VENV)/.peers-installed
$(PEERS_STAMP):
	test -x $(PEERS_VENV)/bin/python || $(PEERS_PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q --timeout 30 --retries 1 \
	    --index-url https://download.pytorch.org/whl/cpu torch torchvision \
	  || $(PEERS_VENV)/bin/python -m pip install -q torch torchvision
	$(PEERS_VENV)/bin/python -m pip install -q timm 'jax[cpu]' optax keras==3.15.1
	$(PEERS_VENV)/bin/python benchmarks/bench_peers.py --check
	touch $@

peers-venv: $(PEERS_STAMP)

# One LAMB step on BERT-base, ResNet-50 and 200x768: mxlamb, MXNet's LAMB, NumPy, the byte bound,
# and the CPU peers (torch foreach, timm, optax, Keras 3) where `make peers-venv` has made
# .venv-peers and checked them.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_step.py $(if $(wildcard $(PEERS_STAMP)),--peers-python $(PEERS_VENV)/bin/python)

# The operator library built with AddressSanitizer and UndefinedBehaviorSanitizer, and the
# operator, optimizer, option and fuzz tests run on it (the sanitizer runtimes preloaded into
# the uninstrumented Python). Leak checking is off: CPython and libmxnet keep memory to exit.
SAN_LIB := build/sanitize/libmxlamb.so
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1
sanitize: $(STAMP)
	$(BIN)/python -c "import setup; setup.compile_operator_library('$(SAN_LIB)', 'build/sanitize/obj', extra_flags='$(SAN_FLAGS)'.split())" >/dev/null
	MXLAMB_LIBRARY=$(SAN_LIB) MXLAMB_FUZZ_EXAMPLES=100 \
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_operators.py tests/test_optimizer.py \
	    tests/test_gradient_options.py tests/test_ema.py tests/test_exclusions.py tests/test_adamw.py \
	    tests/test_float64_options.py tests/test_fuzz.py

# 10,000 steps of a small model; prints the RSS curve and fails if it grows.
rss: $(STAMP)
	$(BIN)/python benchmarks/rss_long_run.py --steps 10000

clean:
	rm -rf build dist mxlamb/libmxlamb.so *.egg-info $(MX2_VENV)

# Re-record tests/data/keras_trajectories.npz from the real Keras 3 Lamb/AdamW (JAX, CPU) in .venv-keras.
.PHONY: keras-reference
keras-reference:
	test -x .venv-keras/bin/python || $(PYTHON) -m venv .venv-keras
	.venv-keras/bin/python -m pip install -q keras==3.15.1 'jax[cpu]' numpy
	KERAS_BACKEND=jax .venv-keras/bin/python tests/keras_reference/record.py --out tests/data/keras_trajectories.npz
