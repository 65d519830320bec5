"""transforms.windowing in batch (FnApiRunner) and streaming (TestStream, DirectRunner).

Every expected record is computed by hand from the listed events.
"""

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to

from beam_dl.features import SpectrogramSpec, WindowSpec
from beam_dl.formats.events import Event
from transforms.windowing import EventTimestamps, WindowedFeatures, WindowedSequences, WindowedSpectrograms

EVENTS = [
  Event('a', 1.0, (1.0,)),
  Event('a', 3.0, (3.0,)),
  Event('a', 12.0, (5.0,)),
  Event('b', 4.0, (2.0,)),
  Event('b', 5.0, (2.0,)),
]


def _clock():
  return 0.0


def _features(key, start, end, values, times, pane='ON_TIME', index=0):
  """The hand computation for one window of one-feature events."""
  n = len(values)
  mean = sum(values) / n
  std = (sum((v - mean) ** 2 for v in values) / n) ** 0.5
  last = max(zip(times, values))
  return {
    'key': key,
    'window_start': start,
    'window_end': end,
    'pane': pane,
    'pane_index': index,
    'count': n,
    'sum': [float(sum(values))],
    'mean': [mean],
    'std': [std],
    'min': [min(values)],
    'max': [max(values)],
    'last': [last[1]],
    'first_time': min(times),
    'last_time': last[0],
    'rate': n / (end - start),
  }


def _batch():
  return TestPipeline(runner='FnApiRunner')


def _streaming():
  return TestPipeline(runner='DirectRunner', options=PipelineOptions(streaming=True))


def _summary(record):
  return (record['key'], record['window_start'], record['pane'], record['count'], record['sum'][0])


def test_fixed_windows_batch_features_exact():
  with _batch() as p:
    out = p | beam.Create(EVENTS) | EventTimestamps() | WindowedFeatures(WindowSpec('fixed', size=10), clock=_clock)
    assert_that(
      out.records,
      equal_to(
        [
          _features('a', 0.0, 10.0, [1.0, 3.0], [1.0, 3.0]),  # mean 2, std 1
          _features('a', 10.0, 20.0, [5.0], [12.0]),
          _features('b', 0.0, 10.0, [2.0, 2.0], [4.0, 5.0]),
        ]
      ),
    )
    assert_that(out.late, equal_to([]), label='NothingLateInBatch')


def test_sliding_and_session_windows_batch():
  with _batch() as p:
    events = p | beam.Create(EVENTS[:3] + [Event('a', 14.0, (7.0,))]) | EventTimestamps()
    sliding = events | 'Sliding' >> WindowedFeatures(
      WindowSpec('sliding', size=10, period=5), route_late=False, clock=_clock
    )
    sessions = events | 'Sessions' >> WindowedFeatures(WindowSpec('session', gap=5), clock=_clock)
    assert_that(
      sliding.records | 'SumSliding' >> beam.Map(_summary),
      equal_to(
        [
          ('a', -5.0, 'ON_TIME', 2, 4.0),
          ('a', 0.0, 'ON_TIME', 2, 4.0),
          ('a', 5.0, 'ON_TIME', 2, 12.0),
          ('a', 10.0, 'ON_TIME', 2, 12.0),
        ]
      ),
      label='SlidingOK',
    )
    assert_that(
      sessions.records,
      equal_to(
        [
          _features('a', 1.0, 8.0, [1.0, 3.0], [1.0, 3.0]),  # session [1, 3 + 5)
          _features('a', 12.0, 19.0, [5.0, 7.0], [12.0, 14.0]),
        ]
      ),
      label='SessionsOK',
    )


def test_last_n_sequences_batch():
  events = [
    Event('a', 1.0, (1.0, 10.0)),
    Event('a', 3.0, (3.0, 30.0)),
    Event('a', 2.0, (2.0, 20.0)),
    Event('a', 15.0, (5.0, 50.0)),
  ]
  with _batch() as p:
    out = (
      p | beam.Create(events) | EventTimestamps() | WindowedSequences(WindowSpec('fixed', size=10), n=2, clock=_clock)
    )
    rows = out.records | beam.Map(
      lambda r: (
        r['key'],
        r['window_start'],
        r['length'],
        r['sequence'].values.tolist(),
        r['sequence'].mask.tolist(),
        r['sequence'].times.tolist(),
      )
    )
    assert_that(
      rows,
      equal_to(
        [
          ('a', 0.0, 2, [[2.0, 20.0], [3.0, 30.0]], [True, True], [2.0, 3.0]),
          ('a', 10.0, 1, [[5.0, 50.0], [0.0, 0.0]], [True, False], [15.0, 0.0]),
        ]
      ),
    )


def test_spectrograms_batch_peak_at_signal_frequency():
  rate = 64.0
  events = [
    Event('s', 100.0 + i / rate, (float(np.sin(2 * np.pi * 8.0 * i / rate)),)) for i in range(128)
  ]  # 2 s of an 8 Hz sine
  spec = WindowSpec('fixed', size=1)
  with _batch() as p:
    out = (
      p
      | beam.Create(events)
      | EventTimestamps()
      | WindowedSpectrograms(spec, SpectrogramSpec(rate, nperseg=16), route_late=False)
    )
    peaks = out.records | beam.Map(
      lambda r: (
        r['window_start'],
        r['missing_samples'],
        r['spectrogram'].shape,
        sorted(set(r['frequencies'][r['spectrogram'].argmax(axis=0)].tolist())),
      )
    )
    assert_that(peaks, equal_to([(100.0, 0, (9, 7), [8.0]), (101.0, 0, (9, 7), [8.0])]))


def _tv(key, time, value):
  return beam.window.TimestampedValue(Event(key, float(time), (float(value),)), time)


def test_streaming_watermark_lateness_and_late_side_output():
  stream = (
    TestStream()
    .add_elements([_tv('a', 1, 1.0), _tv('a', 3, 3.0), _tv('b', 4, 5.0)])
    .advance_watermark_to(12)  # closes [0, 10) on time
    .add_elements([_tv('a', 8, 4.0)])  # late, within 5 s lateness: a LATE pane
    .advance_watermark_to(20)  # past 10 + 5: [0, 10) expires
    .add_elements([_tv('a', 2, 100.0), _tv('a', 21, 7.0)])  # 2 is too late
    .advance_watermark_to_infinity()
  )
  spec = WindowSpec('fixed', size=10, allowed_lateness=5)
  with _streaming() as p:
    out = p | stream | EventTimestamps(from_source=True) | WindowedFeatures(spec, clock=_clock)
    assert_that(
      out.records,
      equal_to(
        [
          _features('a', 0.0, 10.0, [1.0, 3.0], [1.0, 3.0]),
          _features('b', 0.0, 10.0, [5.0], [4.0]),
          _features('a', 0.0, 10.0, [4.0], [8.0], pane='LATE', index=1),  # discarding: new event only
          _features('a', 20.0, 30.0, [7.0], [21.0]),
        ]
      ),
    )
    assert_that(
      out.late,
      equal_to(
        [
          {
            'key': 'a',
            'event_time': 2.0,
            'values': [100.0],
            'window_start': 0.0,
            'window_end': 10.0,
            'window_expiry': 15.0,
            'reason': 'arrived after the watermark passed window end + allowed lateness (15)',
          }
        ]
      ),
      label='LateRouted',
    )


def test_streaming_early_count_trigger_accumulating():
  stream = (
    TestStream()
    .add_elements([_tv('a', 1, 1.0), _tv('a', 2, 3.0)])  # 2 events: an EARLY pane
    .add_elements([_tv('a', 3, 5.0)])
    .advance_watermark_to_infinity()
  )
  spec = WindowSpec('fixed', size=10, early_after_count=2, accumulation='accumulating')
  with _streaming() as p:
    out = p | stream | WindowedFeatures(spec, clock=_clock)
    assert_that(
      out.records | beam.Map(_summary), equal_to([('a', 0.0, 'EARLY', 2, 4.0), ('a', 0.0, 'ON_TIME', 3, 9.0)])
    )


def test_streaming_early_processing_time_trigger_discarding_sequences():
  stream = (
    TestStream()
    .add_elements([_tv('a', 1, 1.0)])
    .advance_processing_time(6)  # > 5 s after the first event: EARLY pane
    .add_elements([_tv('a', 2, 2.0)])
    .advance_watermark_to_infinity()
  )
  spec = WindowSpec('fixed', size=10, early_after_secs=5)
  with _streaming() as p:
    out = p | stream | WindowedSequences(spec, n=3, clock=_clock)
    assert_that(
      out.records | beam.Map(lambda r: (r['pane'], r['sequence'].valid().tolist())),
      equal_to([('EARLY', [[1.0]]), ('ON_TIME', [[2.0]])]),
    )


@pytest.mark.parametrize(
  'advance, panes',
  [
    (0.3, [('ON_TIME', [[1.0], [2.0]])]),  # before the 0.5 s delay: no early pane
    (0.6, [('EARLY', [[1.0]]), ('ON_TIME', [[2.0]])]),  # after it: one
  ],
)
def test_streaming_early_trigger_after_fractional_seconds(advance, panes):
  """A sub-second `early_after_secs` runs (Beam's trigger used to fail to translate) and keeps its 0.5 s."""
  stream = (
    TestStream()
    .add_elements([_tv('a', 1, 1.0)])
    .advance_processing_time(advance)
    .add_elements([_tv('a', 2, 2.0)])
    .advance_watermark_to_infinity()
  )
  spec = WindowSpec('fixed', size=10, early_after_secs=0.5)
  with _streaming() as p:
    out = p | stream | WindowedSequences(spec, n=3, clock=_clock)
    assert_that(out.records | beam.Map(lambda r: (r['pane'], r['sequence'].valid().tolist())), equal_to(panes))


def test_fractional_processing_time_delay_round_trips_through_the_runner_api():
  from apache_beam.runners import pipeline_context
  from apache_beam.transforms import trigger as tr

  context = pipeline_context.PipelineContext()
  for delay, millis in ((0.5, 500), (1.25, 1250), (3, 3000)):
    proto = tr.AfterProcessingTime(delay).to_runner_api(context)
    assert proto.after_processing_time.timestamp_transforms[0].delay.delay_millis == millis
    assert tr.TriggerFn.from_runner_api(proto, context).delay == delay


def test_streaming_event_late_for_one_sliding_window_counts_in_the_other():
  stream = (
    TestStream()
    .add_elements([_tv('a', 1, 1.0)])  # windows [-5, 5) and [0, 10)
    .advance_watermark_to(6)  # [-5, 5) expires (no lateness)
    .add_elements([_tv('a', 3, 3.0)])  # late for [-5, 5), on time for [0, 10)
    .advance_watermark_to_infinity()
  )
  spec = WindowSpec('sliding', size=10, period=5)
  with _streaming() as p:
    out = p | stream | WindowedFeatures(spec, clock=_clock)
    assert_that(
      out.records | beam.Map(_summary), equal_to([('a', -5.0, 'ON_TIME', 1, 1.0), ('a', 0.0, 'ON_TIME', 2, 4.0)])
    )
    assert_that(
      out.late | beam.Map(lambda r: (r['event_time'], r['window_start'], r['window_end'])),
      equal_to([(3.0, -5.0, 5.0)]),
      label='LateForOneWindow',
    )


@pytest.mark.parametrize('kind', ['sliding', 'session', 'global'])
def test_processing_time_early_trigger_in_batch_fires_nothing_early(kind):
  """In batch a processing-time early trigger (the README's sliding spec) runs on the FnApiRunner and gives
  exactly the records of the same spec without it: on-time panes only, for features and sequences."""
  kwargs = {'sliding': dict(size=10, period=5, allowed_lateness=120), 'session': dict(gap=5), 'global': {}}[kind]
  early, plain = WindowSpec(kind, early_after_secs=10, **kwargs), WindowSpec(kind, **kwargs)
  with _batch() as p:
    events = p | beam.Create(EVENTS) | EventTimestamps()
    for label, spec in (('Early', early), ('Plain', plain)):
      feats = events | f'{label}Features' >> WindowedFeatures(spec, clock=_clock)
      seqs = events | f'{label}Sequences' >> WindowedSequences(spec, n=3, clock=_clock)
      assert_that(
        feats.records | f'{label}Summary' >> beam.Map(_summary),
        equal_to(
          {
            'sliding': [
              ('a', -5.0, 'ON_TIME', 2, 4.0),
              ('a', 0.0, 'ON_TIME', 2, 4.0),
              ('a', 5.0, 'ON_TIME', 1, 5.0),
              ('a', 10.0, 'ON_TIME', 1, 5.0),
              ('b', -5.0, 'ON_TIME', 1, 2.0),
              ('b', 0.0, 'ON_TIME', 2, 4.0),
              ('b', 5.0, 'ON_TIME', 1, 2.0),
            ],
            'session': [('a', 1.0, 'ON_TIME', 2, 4.0), ('a', 12.0, 'ON_TIME', 1, 5.0), ('b', 4.0, 'ON_TIME', 2, 4.0)],
            'global': [('a', -9223372036854.775, 'ON_TIME', 3, 9.0), ('b', -9223372036854.775, 'ON_TIME', 2, 4.0)],
          }[kind]
        ),
        label=f'{label}FeaturesOnTime',
      )
      assert_that(
        seqs.records | f'{label}Panes' >> beam.Map(lambda r: (r['key'], r['pane'], r['length'])),
        equal_to(
          {
            'sliding': [('a', 'ON_TIME', 2)] * 2
            + [('a', 'ON_TIME', 1)] * 2
            + [('b', 'ON_TIME', 2)]
            + [('b', 'ON_TIME', 1)] * 2,
            'session': [('a', 'ON_TIME', 2), ('a', 'ON_TIME', 1), ('b', 'ON_TIME', 2)],
            'global': [('a', 'ON_TIME', 3), ('b', 'ON_TIME', 2)],
          }[kind]
        ),
        label=f'{label}SequencesOnTime',
      )


def test_streaming_keeps_the_processing_time_early_trigger():
  spec = WindowSpec('fixed', size=10, early_after_secs=5)
  with _streaming() as p:
    stream = p | TestStream().add_elements([_tv('a', 1, 1.0)]).advance_watermark_to_infinity()
    assert spec.as_run_on(stream) is spec
  with _batch() as p:
    assert spec.as_run_on(p | beam.Create([EVENTS[0]])).early_after_secs is None
