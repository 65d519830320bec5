"""Local services started from the project's own files (tests, demos, benchmarks).

`kafka.KafkaBroker`: a single-node KRaft Kafka broker on 127.0.0.1 from the
Maven Central jars that `make kafka-jars` copies to `.cache/kafka/lib`.
"""
