# One-command set-up: every target creates .venv and installs from the
# project's own files (setup.py + constraints.txt) before it runs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test install clean

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The main job: writes real digit images, trains a Flax CNN, runs the
# flagship classify_images pipeline on the DirectRunner over held-out images.
demo: install
	$(PY) -m pipelines.demo --workdir $(WORKDIR)

# The whole test suite.
test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache

# Wheels for benchmarks/gpu_suite.sh on the accelerator machine (Python 3.12,
# jax/flax/numpy/pillow present, no apache-beam): apache-beam 2.77 and its
# dependencies for cp312 manylinux into the ignored .whl/, minus what that
# machine already has (numpy, pillow, the jax stack: not shadowed) and what the
# DirectRunner never imports (pyarrow is optional in Beam; pymongo, dnspython):
# ~45 MB, under the 64 MiB a device run carries.
GPU_WHEEL_PLATFORMS := --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64
.PHONY: gpu-wheels
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q -d .whl --python-version 3.12 --implementation cp --only-binary=:all: \
		$(GPU_WHEEL_PLATFORMS) apache-beam==2.77.0
	rm -f .whl/numpy-*.whl .whl/jax-*.whl .whl/jaxlib-*.whl .whl/ml_dtypes-*.whl .whl/opt_einsum-*.whl \
		.whl/scipy-*.whl .whl/pillow-*.whl .whl/pyarrow-*.whl .whl/pymongo-*.whl .whl/dnspython-*.whl
	du -sh .whl
