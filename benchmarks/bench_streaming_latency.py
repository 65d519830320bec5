"""Streaming scoring latency: p50/p99 at a measured input rate (TestStream), or Kafka end to end.

    .venv/bin/python -m benchmarks.bench_streaming_latency [--ticks 40] [--per_tick 10 100]
    make kafka-jars && .venv/bin/python -m benchmarks.bench_streaming_latency --kafka \
        [--rates 200 1000 5000] [--seconds 60] [-- <runner flags for score_sequences>]
    make kafka-jars runners kafka-io && .venv/bin/python -m benchmarks.bench_streaming_latency --kafka \
        --flink_kafka_io [--rates 200 1000] [--seconds 60] [-- --max_bundle_time_mills 10 ...]

`--flink_kafka_io`: Beam's Java KafkaIO (cross-language) on the FlinkRunner
(`beam_dl.services.kafka_io`: a Flink 1.19 job server and an expansion
service, Java harness EMBEDDED, Python LOOPBACK in the pipeline process);
one job server for all rates, each rate's job cancelled after it.

Kafka mode (`--kafka`): a broker from `beam_dl.services.kafka`; for each
rate a producer sends events {"key", "time" = now, "value"} over 100 keys
at that steady rate for `--seconds`, with the record time = event time;
`pipelines.score_sequences --kafka_*` runs in its own process (streaming,
the Python Kafka reader, the runner flags after `--`: default the
DirectRunner) and writes scores to a topic that a consumer reads. Latency
of a score = the time the consumer received it minus the `last_time` of
its pane (the produce time of the newest event it covers): produce ->
score, end to end. A rate is held when the last event's score arrives
within 2 s of its produce time. Before timing, one probe event must come
back scored (the pipeline is up and compiled). `warm p50/p99` leave out the
events of the first 10 s, while new batch shapes compile and the first
backlog clears. `event p50/p99` are the warm figures over EARLY panes only:
the pane an event's arrival fires (one EARLY pane per event, or per the
events of one key that reach the window step in one bundle), i.e. event ->
its score. ON_TIME panes (one per key and window, ~1% of the scores at
1,000 events/s with 10 s windows over 100 keys) fire when the watermark
passes the window's end, so their latency is the watermark's delay, not a
response to an event; they are in `warm p50/p99`. Under each rate's row: the warm scores split
at the pipeline's own `latency_s` (its arrival stamp -> the score
formatted) and the rest (the producer -> broker -> reader -> parse, and
the write -> consumer), and the p99 of each 5 s of production (a stall shows
as one bad period, a backlog as a climb).

The scoring path of `pipelines.score_sequences` (WindowedSequences with an
EARLY pane per event -> RunInference with a small Flax LSTM -> score records)
runs in streaming mode on the DirectRunner, fed by a TestStream: each tick
adds `per_tick` events over 10 keys, advances the watermark and the
processing time. Latency is the wall-clock time from an event entering the
windowing step (its arrival stamp) to its score record being formatted: the
same `latency_s` the pipeline writes.

TestStream releases events as fast as the runner takes them, so the input
rate is what the runner sustained (events / wall seconds), stated beside the
latency. The model is trained for a few steps on the CO2 series
(statsmodels); its accuracy is irrelevant here.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream

from beam_dl.features import WindowSpec
from beam_dl.formats.events import Event
from beam_dl.serving.handler import JaxModelHandler
from pipelines import score_sequences_demo as demo
from transforms.inference import RunInferenceWithDeadLetters
from transforms.sequence_scoring import FormatScoreFn, ToModelInputFn
from transforms.windowing import WindowedSequences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMELINE_S = 5.0  # the p99 timeline's period
WARM_UP_S = 10.0  # `warm p50/p99`: events produced after the first 10 s of steady production
LATENCIES: list[float] = []  # the DirectRunner runs in this process


def _collect(record):
  # Imported by name: under `python -m` this file is also `__main__`, whose
  # globals cloudpickle would copy rather than share.
  from benchmarks import bench_streaming_latency as shared  # pylint: disable=g-import-not-at-top

  shared.LATENCIES.append(record['latency_s'])


def stream(ticks: int, per_tick: int, keys: int = 10) -> TestStream:
  rng = np.random.default_rng(0)
  ts = TestStream()
  for tick in range(ticks):
    base = 1000.0 + tick
    events = [Event(f'k{i % keys}', base + i / per_tick, (float(330 + rng.normal()),)) for i in range(per_tick)]
    ts = (
      ts.add_elements([beam.window.TimestampedValue(e, e.time) for e in events])
      .advance_watermark_to(base + 1)
      .advance_processing_time(1)
    )
  return ts.advance_watermark_to_infinity()


def run(model_dir: str, ticks: int, per_tick: int) -> dict:
  from benchmarks import bench_streaming_latency as shared  # pylint: disable=g-import-not-at-top

  shared.LATENCIES.clear()
  spec = WindowSpec('fixed', size=60, early_after_count=1, accumulation='accumulating')
  start = time.perf_counter()
  with beam.Pipeline(runner='DirectRunner', options=PipelineOptions([], streaming=True)) as p:
    seqs = p | stream(ticks, per_tick) | WindowedSequences(spec, 16, num_features=1)
    examples = seqs.records | beam.ParDo(ToModelInputFn(False)).with_outputs('failed', main='ok')
    across_windows = examples.ok | beam.WindowInto(beam.window.GlobalWindows())  # as pipelines.score_sequences
    scored = across_windows | RunInferenceWithDeadLetters(JaxModelHandler(model_dir, max_batch_size=64))
    scored.predictions | beam.ParDo(FormatScoreFn()) | beam.Map(_collect)
  seconds = time.perf_counter() - start
  lat = np.array(shared.LATENCIES) * 1000
  warm = lat[len(lat) // 10 :]  # the first outputs include JIT compiles of the model
  events = ticks * per_tick
  return {
    'events': events,
    'seconds': seconds,
    'rate': events / seconds,
    'outputs': len(lat),
    'p50': np.percentile(lat, 50),
    'p99': np.percentile(lat, 99),
    'max': lat.max(),
    'warm_p50': np.percentile(warm, 50),
    'warm_p99': np.percentile(warm, 99),
  }


# -- Kafka end to end -------------------------------------------------------------


def _consume_scores(servers: str, topic: str, stop: threading.Event, into: list):
  """(receive time, record) for each score on `topic` until `stop` is set."""
  from confluent_kafka import Consumer  # pylint: disable=g-import-not-at-top

  consumer = Consumer(
    {
      'bootstrap.servers': servers,
      'group.id': f'bench-{topic}',
      'log_level': 0,
      'auto.offset.reset': 'earliest',
      'fetch.wait.max.ms': 5,
    }
  )
  consumer.subscribe([topic])
  try:
    while not stop.is_set():
      for message in consumer.consume(1000, timeout=0.05):
        if not message.error():
          into.append((time.time(), json.loads(message.value())))
  finally:
    consumer.close()


def _produce_steady(
  producer,
  topic: str,
  rate: float,
  seconds: float,
  keys: int = 100,
  record: list | None = None,
  key_prefix: str = 'k',
) -> tuple[int, float]:
  """Events at `rate`/s for `seconds` (paced every 5 ms) over keys `<key_prefix><i>`;
  returns (count, time of the last). `record`, when given, gets each event's (key, time)."""
  rng = np.random.default_rng(0)
  start = time.time()
  sent, last = 0, start
  while True:
    now = time.time()
    if now - start >= seconds:
      break
    due = int((now - start) * rate)
    while sent < due:
      t = time.time()
      event = {'key': f'{key_prefix}{sent % keys}', 'time': t, 'value': float(330 + rng.normal())}
      producer.produce(topic, json.dumps(event).encode(), timestamp=int(t * 1000))
      if record is not None:
        record.append((event['key'], t))
      sent, last = sent + 1, t
    producer.poll(0)
    time.sleep(0.005)
  producer.flush(30)
  return sent, last


def pipeline_command(
  bootstrap: str,
  topic: str,
  out: str,
  model_dir: str,
  runner_flags: list[str],
  window_size: float = 10,
  seq_len: int = 16,
  idle_stop_s: float | None = None,
) -> list[str]:
  """`python -m pipelines.score_sequences` from Kafka `topic` to `out` (and `out`-failed), streaming."""
  return [
    sys.executable,
    '-m',
    'pipelines.score_sequences',
    '--streaming',
    '--kafka_bootstrap',
    bootstrap,
    '--kafka_topic',
    topic,
    '--kafka_output_topic',
    out,
    *(['--kafka_stop_after_idle_secs', f'{idle_stop_s:g}'] if idle_stop_s else []),
    *scoring_flags(model_dir, window_size, seq_len),
    '--max_batch_size',
    '64',
    *runner_flags,
  ]


def scoring_flags(model_dir: str, window_size: float, seq_len: int) -> list[str]:
  """What the benchmark's events are scored with (batch or streaming): the model, their `value`
  field, fixed windows of `window_size` seconds, sequences of up to `seq_len` events."""
  return [
    '--model_dir',
    model_dir,
    '--event_value_fields',
    'value',
    '--window',
    'fixed',
    '--window_size',
    f'{window_size:g}',
    '--seq_len',
    str(seq_len),
  ]


def start_pipeline(command: list[str], log_prefix: str):
  """(the pipeline's process in a session of its own, its log file)."""
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')])}
  log = tempfile.NamedTemporaryFile(prefix=log_prefix, suffix='.log', delete=False)
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  return process, log


def wait_until_scoring(producer, topic: str, received: list, pipeline, timeout_s: float) -> float | None:
  """Sends a probe event; seconds until its score came back (the pipeline is up and compiled), None if never."""
  probe_t = time.time()
  producer.produce(
    topic, json.dumps({'key': 'probe', 'time': probe_t, 'value': 330.0}).encode(), timestamp=int(probe_t * 1000)
  )
  producer.flush(30)
  deadline = time.time() + timeout_s
  while not any(r.get('key') == 'probe' for _, r in list(received)):
    if time.time() > deadline or pipeline.poll() is not None:
      return None
    time.sleep(0.1)
  return time.time() - probe_t


def run_kafka(
  broker,
  model_dir: str,
  rate: float,
  seconds: float,
  runner_flags: list[str],
  startup_timeout_s: float = 400.0,
  job_endpoint: str | None = None,
) -> dict:
  """One rate, end to end through Kafka; returns latency percentiles (ms) and whether it held."""
  from confluent_kafka import Producer  # pylint: disable=g-import-not-at-top

  topic, out = f'events-{int(rate)}', f'scores-{int(rate)}'
  for name in (topic, out, f'{out}-failed'):
    broker.create_topic(name)
  received: list = []
  stop = threading.Event()
  consumer = threading.Thread(target=_consume_scores, args=(broker.bootstrap, out, stop, received), daemon=True)
  consumer.start()
  pipeline, log = start_pipeline(
    pipeline_command(broker.bootstrap, topic, out, model_dir, runner_flags, idle_stop_s=5), f'bench_kafka_{int(rate)}_'
  )
  producer = Producer({'bootstrap.servers': broker.bootstrap, 'linger.ms': 1, 'log_level': 0})
  try:
    probe = wait_until_scoring(producer, topic, received, pipeline, startup_timeout_s)
    t0 = time.time()
    sent, last_sent = _produce_steady(producer, topic, rate, seconds)
    produce_s = time.time() - t0
    deadline = time.time() + max(60.0, seconds)  # drain: until the last event's pane arrives
    while time.time() < deadline and pipeline.poll() is None:
      if any(r.get('last_time', 0) >= last_sent - 1e-3 for _, r in list(received)[-2000:]):
        break
      time.sleep(0.1)
  finally:
    stop.set()
    if pipeline.poll() is None:
      os.killpg(pipeline.pid, signal.SIGKILL)
    pipeline.wait(30)
    consumer.join(10)
    if job_endpoint:  # the job outlives its submitter on a job server
      from beam_dl.services import kafka_io  # pylint: disable=g-import-not-at-top

      kafka_io.cancel_running_jobs(job_endpoint)
  timed = [(t, r) for t, r in received if r.get('key') != 'probe' and r.get('last_time', 0) >= t0]
  lat = np.array([t - r['last_time'] for t, r in timed]) * 1000
  warm_timed = [(t, r) for t, r in timed if r['last_time'] >= t0 + WARM_UP_S]
  warm = np.array([t - r['last_time'] for t, r in warm_timed]) * 1000
  event = np.array([t - r['last_time'] for t, r in warm_timed if r.get('pane') == 'EARLY']) * 1000
  # Warm scores split at the pipeline's own `latency_s` (its arrival stamp -> formatted): the rest is
  # outside the Python steps (producer -> broker -> reader -> parse, and the write -> consumer).
  split = np.array([(r['latency_s'], t - r['last_time'] - r['latency_s']) for t, r in warm_timed]).reshape(-1, 2) * 1000
  inside = np.percentile(split[:, 0], [50, 99]) if len(split) else [float('nan')] * 2
  outside = np.percentile(split[:, 1], [50, 99]) if len(split) else [float('nan')] * 2
  # p99 per TIMELINE_S of production: a stall shows as one bad period, a backlog as a climb.
  periods = collections.defaultdict(list)
  for t, r in timed:
    periods[int((r['last_time'] - t0) // TIMELINE_S)].append((t - r['last_time']) * 1000)
  timeline = [round(float(np.percentile(periods[i], 99))) for i in sorted(periods)]
  done = [t for t, r in timed if r['last_time'] >= last_sent - 1e-3]
  tail_ms = (min(done) - last_sent) * 1000 if done else float('inf')
  return {
    'rate': rate,
    'sent': sent,
    'produce_s': produce_s,
    'achieved': sent / produce_s,
    'scores': len(lat),
    'probe_s': probe,
    'p50': np.percentile(lat, 50) if len(lat) else float('nan'),
    'p99': np.percentile(lat, 99) if len(lat) else float('nan'),
    'max': lat.max() if len(lat) else float('nan'),
    'warm_p50': np.percentile(warm, 50) if len(warm) else float('nan'),
    'warm_p99': np.percentile(warm, 99) if len(warm) else float('nan'),
    'event_p50': np.percentile(event, 50) if len(event) else float('nan'),
    'event_p99': np.percentile(event, 99) if len(event) else float('nan'),
    'last_event_ms': tail_ms,
    'held': tail_ms <= 2000,
    'log': log.name,
    'timeline': timeline,
    'inside': inside,
    'outside': outside,
  }


def main_kafka(args, runner_flags: list[str]):
  from beam_dl.services.kafka import KafkaBroker  # pylint: disable=g-import-not-at-top

  model_dir = tempfile.mkdtemp(prefix='latency_model_')
  _, values = demo.load_series()
  demo.train_model(model_dir, values[:400], steps=20)
  print(
    f'Kafka -> score_sequences ({" ".join(runner_flags) or "DirectRunner"}) -> Kafka; '
    f'{args.seconds:g} s per rate; latency = consumer receive time - produce time of the newest event '
    'in the scored pane'
  )
  print(
    f'{"target/s":>8s} {"sent":>7s} {"sent/s":>7s} {"scores":>7s} {"probe s":>7s} '
    f'{"p50 ms":>8s} {"p99 ms":>8s} {"max ms":>8s} {"warm p50":>8s} {"warm p99":>8s} {"event p50":>9s} '
    f'{"event p99":>9s} {"last ev ms":>10s} held',
    flush=True,
  )
  with contextlib.ExitStack() as stack:
    broker = stack.enter_context(KafkaBroker(heap_mb=1024))
    job_endpoint = None
    if args.flink_kafka_io:
      from beam_dl.services import kafka_io  # pylint: disable=g-import-not-at-top

      job_endpoint, expansion = stack.enter_context(
        kafka_io.flink_with_kafka_io(buffer_timeout_ms=args.flink_buffer_timeout_ms)
      )
      runner_flags = [*kafka_io.runner_flags(job_endpoint, expansion), *runner_flags]
      print(
        f'Flink job server {job_endpoint}, KafkaIO expansion service {expansion}; flags: {" ".join(runner_flags)}',
        flush=True,
      )
    for rate in args.rates:
      r = run_kafka(broker, model_dir, rate, args.seconds, runner_flags, job_endpoint=job_endpoint)
      probe = f'{r["probe_s"]:7.1f}' if r['probe_s'] is not None else '   none'
      print(
        f'{rate:8.0f} {r["sent"]:7d} {r["achieved"]:7.0f} {r["scores"]:7d} {probe} {r["p50"]:8.1f} '
        f'{r["p99"]:8.1f} {r["max"]:8.1f} {r["warm_p50"]:8.1f} {r["warm_p99"]:8.1f} {r["event_p50"]:9.1f} '
        f'{r["event_p99"]:9.1f} {r["last_event_ms"]:10.0f} '
        f'{"yes" if r["held"] else "no"}'
        f'   (pipeline log: {r["log"]})',
        flush=True,
      )
      print(
        f'         warm p50/p99 ms in the pipeline (arrival -> formatted) {r["inside"][0]:.0f}/{r["inside"][1]:.0f},'
        f' outside it (Kafka in and out) {r["outside"][0]:.0f}/{r["outside"][1]:.0f};'
        f' p99 ms per {TIMELINE_S:g} s of production: {" ".join(map(str, r["timeline"]))}',
        flush=True,
      )


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  runner_flags = argv[argv.index('--') + 1 :] if '--' in argv else []
  argv = argv[: argv.index('--')] if '--' in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--ticks', type=int, default=40)
  parser.add_argument('--per_tick', type=int, nargs='+', default=[10, 100])
  parser.add_argument('--kafka', action='store_true', help='Kafka end to end instead of TestStream.')
  parser.add_argument('--rates', type=float, nargs='+', default=[200, 1000, 5000])
  parser.add_argument('--seconds', type=float, default=60.0)
  parser.add_argument(
    '--flink_kafka_io',
    action='store_true',
    help="Kafka mode on the FlinkRunner with Beam's Java KafkaIO (make runners kafka-io).",
  )
  parser.add_argument(
    '--flink_buffer_timeout_ms',
    type=int,
    default=None,
    help="With --flink_kafka_io: Flink's network buffer timeout (execution.buffer-timeout; Flink's default 100).",
  )
  args = parser.parse_args(argv)
  if args.kafka:
    return main_kafka(args, runner_flags)
  model_dir = tempfile.mkdtemp(prefix='latency_model_')
  _, values = demo.load_series()
  demo.train_model(model_dir, values[:400], steps=20)
  print(
    'latency ms: all outputs | after the first 10% (JIT warm-up); one output per key per tick '
    '(an EARLY pane fires per bundle)'
  )
  print(
    f'{"events/tick":>11s} {"events":>7s} {"seconds":>8s} {"input ev/s":>10s} {"outputs":>8s} '
    f'{"p50":>7s} {"p99":>7s} {"max":>7s} | {"p50":>6s} {"p99":>6s}'
  )
  for per_tick in args.per_tick:
    r = run(model_dir, args.ticks, per_tick)
    print(
      f'{per_tick:11d} {r["events"]:7d} {r["seconds"]:8.2f} {r["rate"]:10.1f} {r["outputs"]:8d} '
      f'{r["p50"]:7.1f} {r["p99"]:7.1f} {r["max"]:7.1f} | {r["warm_p50"]:6.1f} {r["warm_p99"]:6.1f}',
      flush=True,
    )


if __name__ == '__main__':
  main()
