# One-command set-up: every target creates .venv and installs from the
# project's own files (setup.py + constraints.txt) before it runs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test install clean runners

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

# Beam's real runners for the runner matrix (tests/test_runners.py), into
# .runners/ (git-ignored): Flink 1.19 and Spark 3 job servers assembled by
# Maven from Beam's runner artifacts (runners/pom.xml: a launcher jar named as
# Beam's, plus its -lib/ classpath), and Prism built with Go. Cached: Maven's
# ~/.m2, Go's module and build caches; rebuilt only when the poms change.
RUNNERS_DIR ?= .runners
PRISM_VERSION ?= v2.77.0

runners: $(RUNNERS_DIR)/.job-servers $(RUNNERS_DIR)/prism
	@ls -1 $(abspath $(RUNNERS_DIR))/*job-server*.jar $(abspath $(RUNNERS_DIR))/prism

$(RUNNERS_DIR)/.job-servers: runners/pom.xml runners/flink/pom.xml runners/spark/pom.xml
	mvn -B -q -f runners/pom.xml package -Drunners.dir=$(abspath $(RUNNERS_DIR))
	touch $@

$(RUNNERS_DIR)/prism:
	mkdir -p $(RUNNERS_DIR)
	GOBIN=$(abspath $(RUNNERS_DIR)) go install github.com/apache/beam/sdks/v2/go/cmd/prism@$(PRISM_VERSION)

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache
