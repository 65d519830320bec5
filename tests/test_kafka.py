"""score_sequences against a real Kafka broker: events in, scores and dead letters out.

The broker is the project's own (`beam_dl.services.kafka`, jars from
`make kafka-jars`), started once for this module on a free port. Events go
in with their event time as the Kafka record time; the pipeline runs in
streaming mode on the DirectRunner with the Python Kafka reader (bounded
for the test: it ends once the topic has been idle) and writes JSON records
to an output topic and a dead-letter topic. Every event is accounted for:
in the final pane of its window (the scored sequence holds all of them),
or as a dead letter (malformed, not UTF-8, window too short). Scores equal
the batch pipeline's over the same events written to a file. The same
events and checks run through Beam's Java KafkaIO on the real FlinkRunner
(`beam_dl.services.kafka_io`; `make runners kafka-io`), and late events on
Prism.
"""

import collections
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import apache_beam as beam
import numpy as np
import pytest

from beam_dl.formats.jsonl import read_jsonl
from beam_dl.services import kafka as kafka_service
from beam_dl.services import kafka_io
from beam_dl.services.process import is_loopback, listening_sockets
from pipelines import score_sequences
from tests import runner_matrix, services

pytestmark = pytest.mark.skipif(
  not kafka_service.jars_available(),
  reason=f'no Kafka jars in {kafka_service.kafka_lib()}: run `make kafka-jars` (CI does)',
)

PRISM = runner_matrix.prism_binary() or os.path.join(runner_matrix.RUNNERS_DIR, 'prism')
WINDOW = 60.0
KEYS = ('k0', 'k1', 'k2')
# Not UTF-8: a valid event once its bad byte is "replaced" (key 'k\ufffd0'), so
# a reader that decodes with errors='replace' would score it under a corrupted key.
NOT_UTF8 = b'{"key": "k\xff0", "time": 1230.0, "co2": 331.0}'
MALFORMED = [
  b'{"key": "k0", "time": ',
  b'{"key": "k1", "co2": 331.0}',
  b'{"key": "k2", "time": 1000, "co2": "high"}',
  NOT_UTF8,
]


def _events():
  """Three keys over two 60 s windows, shuffled out of time order; one key with a lone event."""
  rng = np.random.default_rng(7)
  events = []
  for k, key in enumerate(KEYS):
    for _i in range(10 + 3 * k):
      events.append(
        {
          'key': key,
          'time': 1200.0 + round(float(rng.uniform(0, 2 * WINDOW)), 3),
          'co2': round(330.0 + k + float(rng.normal()), 3),
        }
      )
  events.append({'key': 'lonely', 'time': 1250.0, 'co2': 340.0})
  order = rng.permutation(len(events))
  return [events[i] for i in order]


@pytest.fixture(scope='module')
def broker():
  with kafka_service.KafkaBroker() as b:
    yield b


def _produce(broker, topic, events, malformed):
  from confluent_kafka import Producer

  producer = Producer({'bootstrap.servers': broker.bootstrap, 'linger.ms': 5})
  for event in events:
    producer.produce(
      topic, json.dumps(event).encode(), key=event['key'].encode(), timestamp=int(round(event['time'] * 1000))
    )
  for line in malformed:
    producer.produce(topic, line, timestamp=1_230_000)
  assert producer.flush(30) == 0


def _flags(model_dir):
  return [
    '--model_dir',
    model_dir,
    '--event_value_fields',
    'co2',
    '--window',
    'fixed',
    '--window_size',
    str(WINDOW),
    '--seq_len',
    '64',
    '--min_length',
    '2',
    '--forecast',
  ]


@pytest.mark.slow
def test_cluster_ids_never_read_as_a_flag():
  """1 in 64 random ids starts with '-', which StorageTool's parser takes for
  a flag (the broker then never starts: seen once in a benchmark run)."""
  import base64

  ids = [kafka_service.new_cluster_id() for _ in range(5000)]
  assert not [i for i in ids if i.startswith('-')]
  assert all(len(base64.urlsafe_b64decode(i + '==')) == 16 for i in ids)
  assert len(set(ids)) == len(ids)


def test_the_broker_listens_on_loopback_only(broker):
  """The broker's client and controller listeners are on 127.0.0.1: nothing beyond this machine reaches it."""
  listening = listening_sockets([broker.pid])
  assert len(listening) == 2 and all(is_loopback(address) for _, address, _ in listening), listening


@pytest.mark.slow
def test_kafka_in_kafka_out_accounts_for_every_event(broker, co2_lstm_dir, tmp_path):
  model_dir = co2_lstm_dir
  events = _events()
  broker.create_topic('events')
  broker.create_topic('scores')
  broker.create_topic('scores-failed')
  _produce(broker, 'events', events, MALFORMED)

  result = score_sequences.run(
    [
      '--streaming',
      '--kafka_bootstrap',
      broker.bootstrap,
      '--kafka_topic',
      'events',
      '--kafka_output_topic',
      'scores',
      '--kafka_stop_after_idle_secs',
      '3',
      *_flags(model_dir),
    ]
  )
  scores, failed = (
    services.consume_all(broker.bootstrap, 'scores'),
    services.consume_all(broker.bootstrap, 'scores-failed'),
  )
  _assert_every_event_accounted_and_batch_equal(events, scores, failed, model_dir, tmp_path)
  # The Kafka hops: one read lag per record read, one acknowledgement time per record written (both writers).
  counts = collections.Counter()
  for d in result.metrics().query(beam.metrics.MetricsFilter().with_namespace('beam_dl.io.kafka'))['distributions']:
    counts[d.key.metric.name] += d.committed.count
  assert counts['read_lag_ms'] == len(events) + len(MALFORMED)
  assert counts['write_ack_ms'] == len(scores) + len(failed)


@pytest.mark.slow
@pytest.mark.skipif(bool(kafka_io.unavailable()), reason=str(kafka_io.unavailable()) + ' (CI does)')
def test_kafkaio_on_flink_accounts_for_every_event(broker, co2_lstm_dir, tmp_path):
  """Beam's Java KafkaIO (cross-language, EMBEDDED Java harness) on the real FlinkRunner, streaming.

  The same events and checks as the Python reader's test: KafkaIO reads
  them (record CreateTime = event time) and the Python steps run LOOPBACK
  on Flink; the read ends after the records produced (--kafka_max_records).
  """
  events = _events()
  for topic in ('xevents', 'xscores', 'xscores-failed'):
    broker.create_topic(topic)
  _produce(broker, 'xevents', events, MALFORMED)
  with kafka_io.flink_with_kafka_io(str(tmp_path)) as (job_endpoint, expansion_service):
    score_sequences.run(
      [
        '--streaming',
        *kafka_io.runner_flags(job_endpoint, expansion_service),
        '--kafka_bootstrap',
        broker.bootstrap,
        '--kafka_topic',
        'xevents',
        '--kafka_output_topic',
        'xscores',
        '--kafka_max_records',
        str(len(events) + len(MALFORMED)),
        *_flags(co2_lstm_dir),
      ]
    )
  scores, failed = (
    services.consume_all(broker.bootstrap, 'xscores'),
    services.consume_all(broker.bootstrap, 'xscores-failed'),
  )
  _assert_every_event_accounted_and_batch_equal(events, scores, failed, co2_lstm_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(bool(kafka_io.unavailable()), reason=str(kafka_io.unavailable()) + ' (CI does)')
def test_kafkaio_on_flink_scores_while_events_keep_arriving(broker, co2_lstm_dir, tmp_path):
  """An unbounded KafkaIO read on Flink scores events while the producer is still sending.

  Expanded as a splittable DoFn, KafkaIO held every record on Flink until
  its partition had been idle for 2 s, so under a steady stream no score
  came out before the producer stopped. A producer sends 20 events/s for up
  to 150 s; the first score must arrive while it is still sending.
  """
  steady_s = 150.0
  for topic in ('sevents', 'sscores', 'sscores-failed'):
    broker.create_topic(topic)
  stop, producing = threading.Event(), threading.Event()

  def produce_steadily():
    from confluent_kafka import Producer

    producer = Producer({'bootstrap.servers': broker.bootstrap, 'linger.ms': 1, 'log_level': 0})
    rng, start, sent = np.random.default_rng(3), time.time(), 0
    producing.set()
    while not stop.is_set() and time.time() - start < steady_s:
      now = time.time()
      event = {'key': KEYS[sent % len(KEYS)], 'time': now, 'co2': round(330.0 + float(rng.normal()), 3)}
      producer.produce('sevents', json.dumps(event).encode(), timestamp=int(now * 1000))
      producer.poll(0)
      sent += 1
      stop.wait(0.05)
    producer.flush(30)

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([root, os.environ.get('PYTHONPATH', '')])}
  sender = threading.Thread(target=produce_steadily, daemon=True)
  with (
    kafka_io.flink_with_kafka_io(str(tmp_path)) as (job_endpoint, expansion_service),
    open(tmp_path / 'pipeline.log', 'wb') as log,
  ):
    pipeline = subprocess.Popen(
      [
        sys.executable,
        '-m',
        'pipelines.score_sequences',
        '--streaming',
        *kafka_io.runner_flags(job_endpoint, expansion_service),
        '--kafka_bootstrap',
        broker.bootstrap,
        '--kafka_topic',
        'sevents',
        '--kafka_output_topic',
        'sscores',
        '--max_bundle_time_mills',
        '10',
        *_flags(co2_lstm_dir),
      ],
      cwd=root,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
      start_new_session=True,
    )
    try:
      sender.start()
      producing.wait(30)
      first = _wait_for(broker, 'sscores', lambda record: True, deadline_s=steady_s + 60)
      still_sending = sender.is_alive()
    finally:
      stop.set()
      os.killpg(pipeline.pid, signal.SIGKILL)
      pipeline.wait(30)
      kafka_io.cancel_running_jobs(job_endpoint)
      sender.join(60)
  assert first is not None, (tmp_path / 'pipeline.log').read_text()[-3000:]
  assert first['key'] in KEYS
  assert still_sending, 'the first score came only after the producer had stopped sending'


def _assert_every_event_accounted_and_batch_equal(events, scores, failed, model_dir, tmp_path):
  """Each event is in its window's final pane or a dead letter; scores equal the batch pipeline's."""
  # every event: in its window's final pane, or a dead letter
  per_window = {}
  for e in events:
    start = WINDOW * (e['time'] // WINDOW)
    per_window.setdefault((e['key'], start), []).append(e)
  assert not [f for f in failed if f['stage'] not in ('parse_event', 'sequence')], failed
  final = {(s['key'], s['window_start']): s for s in scores if s['pane'] == 'ON_TIME'}
  # A pane with fewer than --min_length events is a `sequence` dead letter; where
  # EARLY panes fire per bundle (Flink: often one event each) a window can have
  # such a dead letter and still a scored ON_TIME pane holding all its events.
  short = {(f['key'], f['window_start']) for f in failed if f['stage'] == 'sequence'} - set(final)
  assert set(final) | short == set(per_window)
  for (key, start), window_events in per_window.items():
    if (key, start) in short:
      assert len(window_events) < 2, sorted(
        (s['pane_index'], s['pane'], s['length']) for s in scores if (s['key'], s['window_start']) == (key, start)
      )
      continue
    record = final[(key, start)]
    assert record['length'] == len(window_events)
    assert record['last_time'] == pytest.approx(max(e['time'] for e in window_events), abs=1e-3)
    newest = max(window_events, key=lambda e: e['time'])
    assert record['target'] == pytest.approx([newest['co2']], abs=1e-4)
  assert sorted(f['stage'] for f in failed if f['stage'] == 'parse_event') == ['parse_event'] * len(MALFORMED)
  not_utf8 = [f for f in failed if 'not valid UTF-8' in f['reason']]
  assert len(not_utf8) == 1 and not_utf8[0]['stage'] == 'parse_event', failed
  assert 'at byte 10' in not_utf8[0]['reason'] and '\\xff' in not_utf8[0]['reason']  # says where and what

  # the same events through the batch pipeline: the same scores
  lines = tmp_path / 'events.jsonl'
  lines.write_text(''.join(json.dumps(e) + '\n' for e in events))
  out = str(tmp_path / 'batch' / 'scores')
  score_sequences.run(['--input', str(lines), '--output', out, *_flags(model_dir)])
  batch = read_jsonl(f'{out}-0*')
  assert {(b['key'], b['window_start']) for b in batch} == set(final)
  for b in batch:
    s = final[(b['key'], b['window_start'])]
    assert s['length'] == b['length']
    np.testing.assert_allclose(s['outputs'], b['outputs'], rtol=1e-5, atol=1e-6)
    assert s['score'] == pytest.approx(b['score'], rel=1e-5, abs=1e-6)


def _wait_for(broker, topic, predicate, deadline_s=180.0):
  """Polls `topic` until a record satisfies `predicate` (bounded); returns it or None."""
  from confluent_kafka import Consumer

  consumer = Consumer(
    {
      'bootstrap.servers': broker.bootstrap,
      'group.id': f'wait-{topic}-{time.time()}',
      'auto.offset.reset': 'earliest',
      'log_level': 0,
    }
  )
  consumer.subscribe([topic])
  deadline = time.monotonic() + deadline_s
  try:
    while time.monotonic() < deadline:
      message = consumer.poll(0.2)
      if message is not None and not message.error() and predicate(json.loads(message.value())):
        return json.loads(message.value())
  finally:
    consumer.close()
  return None


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(PRISM), reason=f'no Prism binary at {PRISM}: run `make runners` (CI does)')
def test_kafka_late_events_on_prism_go_to_late(broker, co2_lstm_dir):
  """On Prism the watermark follows the record times: events behind a closed window are `late`.

  The window [1200, 1260) gets on-time events, an event at t=1400 moves the
  watermark past it, and once its ON_TIME pane is on the output topic (so
  the window is closed) two events for it arrive: both must be `late` dead
  letters, everything else scored.
  """
  broker.create_topic('live')
  broker.create_topic('live-scores')
  broker.create_topic('live-scores-failed')
  on_time = [{'key': key, 'time': 1200.0 + 5 * i, 'co2': 330.0 + i} for key in ('k0', 'k1') for i in range(4)]
  ahead = [{'key': 'k0', 'time': 1400.0, 'co2': 333.0}, {'key': 'k1', 'time': 1401.0, 'co2': 334.0}]
  late = [{'key': 'k0', 'time': 1210.5, 'co2': 399.0}, {'key': 'k1', 'time': 1255.0, 'co2': 399.0}]
  _produce(broker, 'live', on_time + ahead, [])
  closed = {}

  def send_late_once_closed():  # beside the pipeline: Prism's job server must start on the main thread
    closed['pane'] = _wait_for(
      broker, 'live-scores', lambda r: r['key'] == 'k1' and r['window_start'] == 1200.0 and r['pane'] == 'ON_TIME'
    )
    _produce(broker, 'live', late, [])

  sender = threading.Thread(target=send_late_once_closed)
  sender.start()
  score_sequences.run(
    [
      '--streaming',
      '--runner',
      'PrismRunner',
      '--prism_location',
      PRISM,
      '--kafka_bootstrap',
      broker.bootstrap,
      '--kafka_topic',
      'live',
      '--kafka_output_topic',
      'live-scores',
      '--kafka_stop_after_idle_secs',
      '20',
      *_flags(co2_lstm_dir),
    ]
  )
  sender.join()
  assert closed['pane'] is not None, 'window [1200, 1260) never closed'
  scores, failed = (
    services.consume_all(broker.bootstrap, 'live-scores'),
    services.consume_all(broker.bootstrap, 'live-scores-failed'),
  )
  assert sorted((f['key'], f['event_time']) for f in failed if f['stage'] == 'late') == [('k0', 1210.5), ('k1', 1255.0)]
  final = {(s['key'], s['window_start']): s for s in scores if s['pane'] == 'ON_TIME'}
  assert final[('k0', 1200.0)]['length'] == 4 and final[('k1', 1200.0)]['length'] == 4  # late ones not in
  assert not [s for s in scores if s['window_start'] == 1200.0 and s['length'] > 4]
  assert {f['stage'] for f in failed} <= {'late', 'sequence'}  # the lone t=1400 events: too short to score


@pytest.mark.slow
@pytest.mark.skipif(bool(kafka_io.unavailable()), reason=str(kafka_io.unavailable()) + ' (CI does)')
@pytest.mark.timeout(180)
def test_an_xlang_kafka_read_ships_one_jar_with_each_job(tmp_path):
  """The expansion service lists only the KafkaIO jar as the Java environment's dependency: by
  default it lists its whole classpath (135 jars, 140 MB), which the Python SDK uploads to the
  job server with every job although the EMBEDDED harness never reads them."""
  from apache_beam.portability.api import beam_runner_api_pb2

  from beam_dl.io.kafka import ReadKafkaXlang
  from beam_dl.services.process import free_port, port_open, service_process

  port = free_port()
  with service_process(
    kafka_io.expansion_service_command(port),
    log_path=str(tmp_path / 'expansion.log'),
    ready=lambda: port_open(port, 'localhost'),
    timeout_s=120,
  ):
    pipeline = beam.Pipeline()
    _ = pipeline | ReadKafkaXlang('127.0.0.1:9', 'events', f'localhost:{port}')
    proto = pipeline.to_runner_api()
  files = [
    beam_runner_api_pb2.ArtifactFilePayload.FromString(dep.type_payload).path
    for env in proto.components.environments.values()
    for dep in env.dependencies
    if dep.type_urn == 'beam:artifact:type:file:v1'
  ]
  # The SDK fetched each artifact into a local file of its own name: one, the KafkaIO jar's bytes.
  [kafka_jar] = glob.glob(os.path.join(kafka_io.kafka_io_lib(), 'beam-sdks-java-io-kafka-*.jar'))
  assert len(files) == 1 and open(files[0], 'rb').read() == open(kafka_jar, 'rb').read(), files
