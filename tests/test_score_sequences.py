"""pipelines.score_sequences end to end: batch over files, streaming over a watched directory.

The model is a small LSTM trained here (a few dozen steps) on the real Mauna
Loa CO2 series from statsmodels; outputs are checked against the model
applied directly to the hand-built window sequences.
"""

import glob
import json
import logging
import os
import re
import threading
import time

import apache_beam as beam
import jax.numpy as jnp
import numpy as np
import pytest

from beam_dl.models import checkpoints
from pipelines import score_sequences
from pipelines import score_sequences_demo as demo

WEEK = demo.WEEK
N_EVENTS = 160


@pytest.fixture(scope='module')
def co2():
  times, values = demo.load_series()
  return times[:N_EVENTS], values[:N_EVENTS]


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory, co2):
  path = str(tmp_path_factory.mktemp('co2_model'))
  fit = demo.train_model(path, co2[1], steps=40, cell='gru', pooling='attention')
  assert fit['final_loss'] < fit['first_loss']  # real training
  return path


def _read(pattern):
  records = []
  for path in sorted(glob.glob(pattern)):
    with open(path, encoding='utf-8') as f:
      records.extend(json.loads(line) for line in f if line.strip())
  return records


def _model_outputs(model_dir, steps):
  spec, variables = checkpoints.load(model_dir)
  x = spec.normalize(jnp.asarray(np.asarray(steps, np.float32)[None, :, None]))
  return np.asarray(spec.build().apply(variables, x, jnp.ones((1, len(steps)), bool)))[0]


def test_batch_scores_every_window_and_dead_letters(tmp_path, co2, model_dir, caplog):
  times, values = co2
  events = tmp_path / 'events.jsonl'
  with open(events, 'w') as f:
    for t, v in zip(times, values):
      f.write(json.dumps({'key': 'mlo', 'time': t, 'co2': None if np.isnan(v) else float(v)}) + '\n')
    f.write('{"key": "mlo", "time": 5\n')  # truncated
    f.write(json.dumps({'key': 'mlo', 'time': 'soon', 'co2': 1.0}) + '\n')
  out = str(tmp_path / 'scores')
  with caplog.at_level(logging.INFO, logger='beam_dl'):
    result = score_sequences.run(
      [
        '--runner',
        'FnApiRunner',
        '--input',
        str(events),
        '--model_dir',
        model_dir,
        '--output',
        out,
        '--event_value_fields',
        'co2',
        '--window',
        'sliding',
        '--window_size',
        str(12 * WEEK),
        '--window_period',
        str(WEEK),
        '--seq_len',
        '12',
        '--min_length',
        '8',
        '--forecast',
      ]
    )
  scores, failed = _read(f'{out}-0*.jsonl'), _read(f'{out}_failed-*.jsonl')
  # The documented log line, even in a run shorter than the 10 s log interval.
  assert any(
    re.match(
      r'score_sequences latency over last \d+ outputs: p50 [\d.]+ ms, p99 [\d.]+ ms '
      r'\(p50/p99 ms per hop: window [\d.]+/[\d.]+, handoff [\d.]+/[\d.]+, model [\d.]+/[\d.]+\)',
      r.getMessage(),
    )
    for r in caplog.records
  ), [r.getMessage() for r in caplog.records]

  valid = ~np.isnan(values)
  stages = [f['stage'] for f in failed]
  assert stages.count('parse_event') == 2 + int((~valid).sum())  # malformed + missing readings
  # Hand computation of the windows: start k * WEEK, 12 weeks long.
  expected = {}
  for t, v in zip(times[valid], values[valid]):
    first = int(np.floor(t / WEEK)) - 11
    for k in range(first, first + 12):
      expected.setdefault(k * WEEK, []).append((t, v))
  short = {f['window_start'] for f in failed if f['stage'] == 'sequence'}
  scored = {s['window_start'] for s in scores}
  assert len(scores) == len(scored) and not scored & short
  assert scored | short == set(expected)
  assert short == {k for k, evs in expected.items() if len(evs) < 8}

  checked = 0
  for record in sorted(scores, key=lambda s: s['window_start'])[::25]:
    window = sorted(expected[record['window_start']])
    assert record['key'] == 'mlo' and record['length'] == len(window)
    assert record['target'] == [np.float32(window[-1][1])]  # sequences are float32 model inputs
    assert record['last_time'] == window[-1][0]
    assert record['window_end'] == record['window_start'] + 12 * WEEK and record['pane'] == 'ON_TIME'
    want = _model_outputs(model_dir, [v for _, v in window[:-1]])
    np.testing.assert_allclose(record['outputs'], want, rtol=1e-4, atol=1e-5)
    assert record['score'] == pytest.approx(abs(window[-1][1] - record['prediction'][0]), abs=1e-4)
    assert record['latency_s'] >= 0
    checked += 1
  assert checked >= 4
  # The panes of many windows make one model call: RunInference batches per window, so the examples
  # cross into the global window before it (one call per window before that; max_batch_size 256).
  calls = _model_calls(result)
  assert 0 < calls <= -(-len(scores) // 256) + 1 < len(scored)


def _model_calls(result) -> int:
  """How many batches RunInference handed the model (its batch-size distribution's count)."""
  from beam_dl.serving.handler import METRICS_NAMESPACE

  query = beam.metrics.MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name('inference_request_batch_size')
  return sum(d.committed.count for d in result.metrics().query(query)['distributions'])


def test_streaming_watched_directory_picks_up_new_files(tmp_path, model_dir):
  watched = tmp_path / 'incoming'
  watched.mkdir()
  batches = {'s1': [330.0, 331.0, 333.5, 332.0, 334.0], 's2': [350.0, 351.0, 349.0, 352.0, 353.0]}

  def land_files():  # written while the pipeline runs, renamed in atomically
    for i, (key, series) in enumerate(batches.items()):
      time.sleep(1.5)
      tmp = watched / f'.part{i}'
      with open(tmp, 'w') as f:
        for step, value in enumerate(series):
          f.write(json.dumps({'key': key, 'time': 1000.0 + step, 'co2': value}) + '\n')
        f.write('not json\n')
      os.rename(tmp, watched / f'events{i}.jsonl')

  writer = threading.Thread(target=land_files)
  writer.start()
  out = str(tmp_path / 'out' / 'scores')
  result = score_sequences.run(
    [
      '--streaming',
      '--input',
      str(watched / '*.jsonl'),
      '--model_dir',
      model_dir,
      '--output',
      out,
      '--event_value_fields',
      'co2',
      '--window',
      'fixed',
      '--window_size',
      '3600',
      '--seq_len',
      '8',
      '--forecast',
      '--stop_after_secs',
      '6',
      '--poll_interval_secs',
      '0.5',
      '--write_frequency_secs',
      '2',
    ]
  )
  writer.join()
  scores, failed = _read(f'{out}-2*.jsonl'), _read(f'{out}_failed-*.jsonl')
  final = {s['key']: s for s in scores if s['pane'] == 'ON_TIME'}
  assert set(final) == {'s1', 's2'}
  for key, series in batches.items():
    record = final[key]
    assert record['length'] == 5 and record['target'] == [series[-1]]
    want = _model_outputs(model_dir, series[:-1])  # events ordered by their own time
    np.testing.assert_allclose(record['outputs'], want, rtol=1e-4, atol=1e-5)
    assert record['latency_s'] >= 0
  assert all(s['pane'] in ('EARLY', 'ON_TIME') for s in scores)
  assert [f['stage'] for f in failed] == ['parse_event', 'parse_event']
  assert not any({'arrival', 'emitted', 'to_model'} & set(s) for s in scores)  # stamps stay inside
  summary = score_sequences.latency_summary(result)
  assert summary['files_matched'] == 2 and summary['scored'] == len(scores)
  # Where the time went: the hops add up to the whole path (each rounded down to a ms).
  hops = [summary[f'hop_{name}_mean_ms'] for name in ('window', 'handoff', 'model')]
  assert all(h >= 0 for h in hops)
  assert summary['latency_mean_ms'] - 3 <= sum(hops) <= summary['latency_mean_ms']


def test_pubsub_source_turns_streaming_on(model_dir, tmp_path):
  """An unbounded source implies streaming: no --streaming needed (Flex Templates can't pass it)."""
  from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

  options = PipelineOptions(
    [
      f'--model_dir={model_dir}',
      f'--output={tmp_path}/scores',
      '--event_value_fields=co2',
      '--input_subscription=projects/my-project/subscriptions/events',
    ]
  )
  pipeline = beam.Pipeline(options=options)
  score_sequences.build(pipeline, options)
  assert options.view_as(StandardOptions).streaming
  labels = {t.unique_name for t in pipeline.to_runner_api().components.transforms.values()}
  assert any('ReadFromPubSub' in label for label in labels), sorted(labels)


def test_files_in_kafka_out_reads_the_files(model_dir, tmp_path):
  """--kafka_bootstrap with only an output topic writes to Kafka; the events still come from --input."""
  from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

  events = tmp_path / 'events.jsonl'
  events.write_text('{"key": "a", "time": 1.0, "co2": 330.0}\n')
  options = PipelineOptions(
    [
      f'--model_dir={model_dir}',
      f'--input={events}',
      '--event_value_fields=co2',
      '--kafka_bootstrap=127.0.0.1:9',
      '--kafka_output_topic=scores',
    ]
  )
  pipeline = beam.Pipeline(options=options)
  score_sequences.build(pipeline, options)
  assert not options.view_as(StandardOptions).streaming  # files are bounded: batch
  labels = {t.unique_name for t in pipeline.to_runner_api().components.transforms.values()}
  assert 'ReadEvents/ReadText' in labels and not any('Kafka' in label and 'Read' in label for label in labels)
  assert 'ScoresToKafka/Produce' in labels


def test_an_empty_pane_is_dropped_and_counted_a_short_one_is_a_dead_letter():
  """A pane without events (how Flink closes a window after its allowed lateness) carries no
  input: no score, no dead letter, one `empty_panes`. A pane with events below --min_length is
  a `sequence` dead letter."""
  from apache_beam.metrics.metric import MetricsFilter
  from apache_beam.testing.util import assert_that, equal_to

  from beam_dl.features.lastn import Sequence
  from transforms.sequence_scoring import NAMESPACE, ToModelInputFn

  def record(key, n):
    values = np.zeros((4, 1), np.float32)
    values[:n, 0] = np.arange(n)
    mask = np.arange(4) < n
    times = np.where(mask, np.arange(4, dtype=np.float64), 0.0)
    context = {'window_start': 0.0, 'window_end': 2.0, 'pane': 'LATE', 'pane_index': 3, 'length': n}
    return {'key': key, 'sequence': Sequence(values, mask, times), **context}

  p = beam.Pipeline('DirectRunner')
  out = (
    p
    | beam.Create([record('empty', 0), record('short', 1), record('long', 3)])
    | beam.ParDo(ToModelInputFn(forecast=False, min_length=2)).with_outputs('failed', main='examples')
  )
  assert_that(out.examples | beam.Map(lambda e: json.loads(e[0])['key']), equal_to(['long']), label='scored')
  assert_that(out.failed | beam.Map(lambda f: (f['key'], f['stage'])), equal_to([('short', 'sequence')]), label='dead')
  result = p.run()
  result.wait_until_finish()
  counters = {
    c.key.metric.name: c.committed
    for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))['counters']
  }
  assert counters['empty_panes'] == 1 and counters['windows_too_short'] == 1


@pytest.mark.parametrize('live_source', [True, False])
def test_a_score_keeps_its_panes_timestamp_and_a_live_source_times_its_source_hop(live_source):
  """RunInference in the global window emits its batches at the end of time: the score is put back at its
  pane's timestamp (the window's last instant), which file output by window needs. From a live source,
  event time -> arrival is the source hop (`hop_source_ms`); from replayed history it is not measured."""
  from apache_beam.metrics.metric import MetricsFilter
  from apache_beam.ml.inference.base import PredictionResult
  from apache_beam.testing.util import assert_that, equal_to

  from beam_dl.features.lastn import Sequence
  from transforms.sequence_scoring import NAMESPACE, FormatScoreFn, model_input

  values = np.array([[1.0], [2.0], [0.0]], np.float32)
  sequence = Sequence(values, np.array([True, True, False]), np.array([10.0, 11.0, 0.0]), arrival=11.25)
  pane = {'key': 'k', 'window_start': 0.0, 'window_end': 20.0, 'pane': 'EARLY', 'pane_index': 0, 'length': 2}
  context, _ = model_input({**pane, 'sequence': sequence}, forecast=False, now=11.5, timestamp_us=19_999_999)
  p = beam.Pipeline('FnApiRunner')
  scores = (
    p
    | beam.Create([(context, PredictionResult(values[:2], np.array([0.5], np.float32)))])
    | beam.WindowInto(beam.window.GlobalWindows())
    | beam.Map(
      lambda element: beam.window.TimestampedValue(element, beam.window.GlobalWindow().max_timestamp())
    )  # as RunInference
    | beam.ParDo(FormatScoreFn(clock=lambda: 12.0, live_source=live_source))
  )
  stamped = scores | beam.Map(lambda r, t=beam.DoFn.TimestampParam: (r['key'], r['outputs'], r['latency_s'], t.micros))
  assert_that(stamped, equal_to([('k', [0.5], 0.75, 19_999_999)]))
  result = p.run()
  result.wait_until_finish()
  hops = {
    d.key.metric.name: d.committed
    for d in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))['distributions']
  }
  assert hops['hop_model_ms'].sum == 500  # to_model 11.5 -> formatted 12.0
  if live_source:
    assert hops['hop_source_ms'].sum == 250  # last_time 11.0 -> arrival 11.25
  else:
    assert 'hop_source_ms' not in hops
