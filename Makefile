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

# A Prometheus Pushgateway for tests/test_metrics_export.py, built with Go from the
# versions pinned in tools/pushgateway (go.mod/go.sum), cached outside the repo.
TOOLS_BIN ?= $(HOME)/.cache/beam_dl/bin
.PHONY: pushgateway
pushgateway: $(TOOLS_BIN)/pushgateway
$(TOOLS_BIN)/pushgateway: tools/pushgateway/go.mod tools/pushgateway/go.sum
	cd tools/pushgateway && go build -o $(TOOLS_BIN)/pushgateway github.com/prometheus/pushgateway
