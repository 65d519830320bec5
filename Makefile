# One-command set-up: every target creates .venv and installs from the
# project's own files (setup.py + constraints.txt) before it runs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test test-quick lint format services install clean hdfs runners boot kafka-jars kafka-io pushgateway

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

# What the tests start, fetched or built from the project's own files (Maven
# poms, pinned Go modules; cached in ~/.m2 and Go's caches): Beam's Flink and
# Spark job servers and Prism, the Kafka broker, the HDFS mini-cluster, a
# Prometheus Pushgateway.
services: runners kafka-jars kafka-io hdfs pushgateway

# The whole test suite (CI runs this), real runners and services included,
# after the linter and the formatter's check (seconds).
test: install lint services
	$(PY) -m pytest tests -m 'not long' --durations=25 $(PYTEST_ARGS)

# ruff (ruff.toml): lint and formatting checks; `make format` rewrites in place.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The quick tier for local iteration: no end-to-end runs over ~20 s, no
# real-runner cells, nothing to fetch (tests needing a service skip).
test-quick: install
	$(PY) -m pytest tests -m 'not slow and not runner' $(PYTEST_ARGS)

# Jars for the one-node HDFS that tests/test_hdfs.py starts (Hadoop's
# hadoop-client-minicluster from Maven Central, cached in ~/.m2) -> .cache/hadoop/lib.
HADOOP_LIB ?= .cache/hadoop/lib
hdfs: $(HADOOP_LIB)/.fetched

$(HADOOP_LIB)/.fetched: third_party/hadoop/pom.xml
	mvn -q -B -f third_party/hadoop/pom.xml dependency:copy-dependencies -DoutputDirectory=$(CURDIR)/$(HADOOP_LIB) -DincludeScope=runtime
	touch $@

# Beam's real runners for the runner matrix (tests/test_runners.py), into
# .runners/ (git-ignored): Flink 1.19 and Spark 3 job servers assembled by
# Maven from Beam's runner artifacts (third_party/beam-runners/pom.xml: a launcher jar named as
# Beam's, plus its -lib/ classpath), and Prism built with Go. Cached: Maven's
# ~/.m2, Go's module and build caches; rebuilt only when the poms change.
RUNNERS_DIR ?= .runners
PRISM_VERSION ?= v2.77.0

runners: $(RUNNERS_DIR)/.job-servers $(RUNNERS_DIR)/prism boot
	@ls -1 $(abspath $(RUNNERS_DIR))/*job-server*.jar $(abspath $(RUNNERS_DIR))/prism $(abspath $(RUNNERS_DIR))/python_boot

$(RUNNERS_DIR)/.job-servers: third_party/beam-runners/pom.xml third_party/beam-runners/flink/pom.xml \
		third_party/beam-runners/spark/pom.xml third_party/beam-runners/staging/pom.xml \
		$(wildcard third_party/beam-runners/staging/src/main/java/beam_dl/runners/*.java)
	mvn -B -q -f third_party/beam-runners/pom.xml package -Drunners.dir=$(abspath $(RUNNERS_DIR))
	touch $@

$(RUNNERS_DIR)/prism:
	mkdir -p $(RUNNERS_DIR)
	GOBIN=$(abspath $(RUNNERS_DIR)) go install github.com/apache/beam/sdks/v2/go/cmd/prism@$(PRISM_VERSION)

# Beam's Python SDK boot binary (the entry point of Beam's Python containers), which
# the Flink and Spark clusters of beam_dl.services run as PROCESS environments: it
# starts sdk_worker_main for each worker a TaskManager or executor asks for. Built
# with Go from the same Beam module as Prism (the Python SDK's version, $(PRISM_VERSION)).
boot: $(RUNNERS_DIR)/python_boot
$(RUNNERS_DIR)/python_boot:
	mkdir -p $(RUNNERS_DIR)/.boot
	GOBIN=$(abspath $(RUNNERS_DIR))/.boot go install github.com/apache/beam/sdks/v2/python/container@$(PRISM_VERSION)
	mv $(RUNNERS_DIR)/.boot/container $@ && rmdir $(RUNNERS_DIR)/.boot

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache .runners .cache

# Kafka broker jars (org.apache.kafka:kafka_2.13, KRaft) for tests/test_kafka.py, the
# streaming latency benchmark and `python -m beam_dl.services.kafka`: Maven Central
# -> ~/.m2 -> .cache/kafka/lib (ignored). Needs Java 17+ and mvn.
KAFKA_LIB ?= .cache/kafka/lib
kafka-jars: $(KAFKA_LIB)/.fetched
$(KAFKA_LIB)/.fetched: third_party/kafka/pom.xml
	mvn -q -B -f third_party/kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(CURDIR)/$(KAFKA_LIB)
	touch $@


# Beam's Java KafkaIO (cross-language ReadFromKafka) for Flink without Docker: non-shaded Beam
# 2.62 artifacts (third_party/kafka-io/pom.xml) -> .runners/kafka-io-lib (ignored), the classpath
# of beam_dl.services.kafka_io's expansion service and of the Flink job server it starts.
kafka-io: $(RUNNERS_DIR)/kafka-io-lib/.fetched
$(RUNNERS_DIR)/kafka-io-lib/.fetched: third_party/kafka-io/pom.xml
	mvn -q -B -f third_party/kafka-io/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=$(abspath $(RUNNERS_DIR))/kafka-io-lib
	touch $@


# A Prometheus Pushgateway for tests/test_metrics_export.py, built with Go from the
# versions pinned in third_party/pushgateway (go.mod/go.sum), cached outside the repo.
TOOLS_BIN ?= $(HOME)/.cache/beam_dl/bin
pushgateway: $(TOOLS_BIN)/pushgateway
$(TOOLS_BIN)/pushgateway: third_party/pushgateway/go.mod third_party/pushgateway/go.sum
	cd third_party/pushgateway && go build -o $(TOOLS_BIN)/pushgateway github.com/prometheus/pushgateway

# Wheels for benchmarks/gpu_suite.sh on the accelerator machine (Python 3.12,
# jax/flax/numpy/pillow present, no apache-beam): apache-beam 2.77 and its
# dependencies for cp312 manylinux into the ignored .whl/, minus what that
# machine already has (numpy, pillow, the jax stack: not shadowed) and pyarrow
# (optional in Beam, and large), plus google-crc32c, which beam_dl.io.tfrecord
# needs and Beam does not pull in. pymongo stays: without its bson, importing
# apache_beam.io logs "Could not find a compatible bson package" in every
# process. Under the 64 MiB a device run carries.
GPU_WHEEL_PLATFORMS := --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64
.PHONY: gpu-wheels
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q -d .whl --python-version 3.12 --implementation cp --only-binary=:all: \
		$(GPU_WHEEL_PLATFORMS) apache-beam==2.77.0 google-crc32c==1.9.0
	rm -f .whl/numpy-*.whl .whl/jax-*.whl .whl/jaxlib-*.whl .whl/ml_dtypes-*.whl .whl/opt_einsum-*.whl \
		.whl/scipy-*.whl .whl/pillow-*.whl .whl/pyarrow-*.whl
	du -sh .whl

# Ray Data for bench_flagship's `ray` mode (the same job written with Ray Data,
# benchmarks/ray_flagship.py), in its own venv: Ray next to the project's pins
# for what both sides import (Beam, the jax stack, Pillow), kept out of .venv
# so it can never move a pin the tests run on.
RAY_VENV ?= $(HOME)/.cache/beam_dl/ray-venv
.PHONY: ray-venv
ray-venv: $(RAY_VENV)/.installed
$(RAY_VENV)/.installed: constraints.txt
	test -x $(RAY_VENV)/bin/python || $(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/pip install -q -c constraints.txt apache-beam==2.77.0 objsize jax==0.10.2 jaxlib==0.10.2 \
		flax==0.12.8 numpy==2.4.6 pillow==12.3.0 orbax-checkpoint==0.12.8 'ray[data]==2.60.0'
	touch $@

# A rehearsal of the device run on this machine: a Python 3.12 venv holding only
# what the accelerator machine has (its jax stack, CPU build, at the versions
# seen there), the carried wheels installed as gpu_suite.sh installs them, and
# the suite at its tiny CPU sizes. Catches a wheel missing from .whl/ before a
# session spends its few device minutes on it (google-crc32c once did).
GPU_REHEARSAL_VENV ?= $(HOME)/.cache/beam_dl/gpu-rehearsal
# Python 3.12, as the device machine has: pyenv's if it has one, else python3.12 on PATH.
PYTHON312 ?= $(shell v=$$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1); \
	if [ -n "$$v" ]; then echo "$$(pyenv prefix $$v)/bin/python3.12"; else echo python3.12; fi)
.PHONY: gpu-rehearsal
gpu-rehearsal: gpu-wheels
	test -x $(GPU_REHEARSAL_VENV)/bin/python || $(PYTHON312) -m venv $(GPU_REHEARSAL_VENV)
	$(GPU_REHEARSAL_VENV)/bin/pip install -q jax==0.11.2 flax==0.12.10 optax==0.2.8 orbax-checkpoint==0.12.4 \
		numpy==2.5.2 pillow
	rm -rf /tmp/site
	env -i HOME=$(HOME) PATH=/usr/bin:/bin PYTHON=$(GPU_REHEARSAL_VENV)/bin/python GPU_SUITE_TINY=1 \
		bash benchmarks/gpu_suite.sh
