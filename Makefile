# One-command set-up: every target creates .venv and installs from the
# project's own files (setup.py + constraints.txt) before it runs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test install clean hdfs

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

# Jars for the one-node HDFS that tests/test_hdfs.py starts (Hadoop's
# hadoop-client-minicluster from Maven Central, cached in ~/.m2) -> hadoop/lib.
hdfs: hadoop/lib/.fetched

hadoop/lib/.fetched: hadoop/pom.xml
	mvn -q -B -f hadoop/pom.xml dependency:copy-dependencies -DoutputDirectory=lib -DincludeScope=runtime
	touch $@

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache hadoop/lib
