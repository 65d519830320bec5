"""The vectorised batch path of WindowedFeatures gives the streaming path's records."""

import json

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_dl.features import WindowSpec, batch_windows
from beam_dl.formats.events import Event, EventSpec
from transforms.sequences import ReadEventBlocks, ReadEvents
from transforms.windowing import EventTimestamps, WindowedFeatures


def _events():
  rng = np.random.default_rng(1)
  events = [
    Event(f'k{rng.integers(0, 5)}', float(rng.uniform(-30, 600)), (float(rng.normal()), float(rng.integers(0, 3))))
    for _ in range(1500)
  ]
  # same time, different values: "last" is the largest value tuple on both paths
  events += [Event('tie', 10.0, (1.0, 2.0)), Event('tie', 10.0, (3.0, 0.0)), Event('tie', 10.0, (2.0, 5.0))]
  # on a window boundary, and a fractional microsecond
  events += [Event('edge', 60.0, (1.0, 1.0)), Event('edge', 59.9999995, (2.0, 2.0))]
  return events


def _matches(expected_records):
  expected = {(r['key'], r['window_start']): r for r in expected_records}

  def check(actual_records):
    actual = {(r['key'], r['window_start']): r for r in actual_records}
    assert sorted(actual) == sorted(expected)
    for k, record in actual.items():
      assert sorted(record) == sorted(expected[k])
      for field, value in record.items():
        if isinstance(value, (float, list)):
          assert value == pytest.approx(expected[k][field], rel=1e-9, abs=1e-12), (k, field)
        else:
          assert value == expected[k][field], (k, field)

  return check


def _blocks(events, sizes=(0, 1, 400, 7, 700)):
  """The events cut into EventBlocks of these sizes (an empty one too), the rest in the last."""
  blocks, at = [], 0
  for size in sizes:
    blocks.append(batch_windows.events_block(events[at : at + size]))
    at += size
  blocks.append(batch_windows.events_block(events[at:]))
  return blocks


def _tagged(record, w=beam.DoFn.WindowParam, t=beam.DoFn.TimestampParam):
  # each record tagged with the window/timestamp it was in (in milliseconds:
  # the portable runner encodes timestamps that crossed a stage in ms)
  return {**record, '_window': (w.start.micros, w.end.micros), '_timestamp_ms': int(t.micros / 1000)}


def _listed(records, label):
  return (
    records
    | f'Tag{label}' >> beam.Map(_tagged)
    | f'Global{label}' >> beam.WindowInto(beam.window.GlobalWindows())
    | f'List{label}' >> beam.combiners.ToList()
  )


@pytest.mark.parametrize(
  'spec',
  [
    pytest.param(WindowSpec('fixed', size=60.0), id='fixed'),
    pytest.param(WindowSpec('sliding', size=60.0, period=20.0), id='sliding', marks=pytest.mark.slow),
    pytest.param(WindowSpec('sliding', size=60.0, period=25.0), id='sliding-uneven'),
  ],
)
def test_batch_path_gives_the_streaming_paths_records(spec):
  """Event input and EventBlock input (keys spread over several blocks, one
  empty) against the streaming path with its late-data gate, on the same events."""
  events = _events()
  with TestPipeline() as p:
    stamped = p | beam.Create(events) | EventTimestamps()
    streaming_path = stamped | 'Streaming' >> WindowedFeatures(spec, batch_path=False)
    batch_path = stamped | 'Batch' >> WindowedFeatures(spec, batch_path=True)
    block_path = (
      p | 'Blocks' >> beam.Create(_blocks(events)) | 'BatchBlocks' >> WindowedFeatures(spec, event_blocks=True)
    )
    expected = beam.pvalue.AsSingleton(_listed(streaming_path.records, 'Streaming'))
    for label, out in (('Events', batch_path), ('EventBlocks', block_path)):
      assert_that(
        _listed(out.records, label)
        | f'Compare{label}' >> beam.Map(lambda a, exp: _matches(exp)(a) or len(a), exp=expected),
        lambda n: _at_least(n, 50),
        label=f'Same{label}',
      )
      assert_that(out.late, equal_to([]), label=f'NoLate{label}')
    assert_that(streaming_path.late, equal_to([]), label='NothingLateInBatch')


def test_blocks_outside_the_batch_path_are_unpacked_into_events():
  """Session windows take the streaming path: blocks give the Events' records."""
  events = _events()[:700]
  spec = WindowSpec('session', gap=1.0)
  with TestPipeline() as p:
    from_events = p | beam.Create(events) | EventTimestamps() | 'Events' >> WindowedFeatures(spec)
    from_blocks = (
      p | 'Blocks' >> beam.Create(_blocks(events)) | 'FromBlocks' >> WindowedFeatures(spec, event_blocks=True)
    )
    expected = beam.pvalue.AsSingleton(_listed(from_events.records, 'Events'))
    assert_that(
      _listed(from_blocks.records, 'Blocks') | beam.Map(lambda a, exp: _matches(exp)(a) or len(a), exp=expected),
      lambda n: _at_least(n, 50),
    )


def test_split_by_key_block_partitions_the_events():
  block = batch_windows.events_block(_events())
  pieces = batch_windows.split_by_key_block(block, 4)
  assert sorted(number for number, _ in pieces) == sorted({batch_windows.block_of(k, 4) for k in block.keys})
  for number, piece in pieces:
    assert {batch_windows.block_of(k, 4) for k in piece.keys} == {number}
  rows = sorted(
    (k, m, tuple(v)) for _, piece in pieces for k, m, v in zip(piece.keys, piece.micros, piece.values.tolist())
  )
  assert rows == sorted(zip(block.keys, block.micros, map(tuple, block.values.tolist())))
  assert batch_windows.split_by_key_block(batch_windows.events_block([]), 4) == []


def test_event_block_times_are_beams_timestamps():
  times = [-12.3, -0.0000005, 0.0, 59.9999995, 1.0000001, 1_700_000_000.123456, 3600.0]
  block = batch_windows.event_block(['a'] * len(times), times, [[1.0]] * len(times))
  assert block.micros.tolist() == [beam.utils.timestamp.Timestamp.of(t).micros for t in times]
  with pytest.raises(ValueError, match='as many keys'):
    batch_windows.event_block(['a', 'b'], [1.0], [[1.0]])


def _at_least(n, minimum):
  assert n[0] >= minimum, n


def test_applies_only_to_bounded_batch_fixed_or_sliding_without_early_panes():
  p = beam.Pipeline(options=PipelineOptions([]))
  bounded = p | beam.Create([1])
  assert batch_windows.applies(WindowSpec('fixed', size=60.0), bounded)
  assert batch_windows.applies(WindowSpec('sliding', size=60.0, period=30.0), bounded)
  assert not batch_windows.applies(WindowSpec('session', gap=10.0), bounded)
  assert not batch_windows.applies(WindowSpec('fixed', size=60.0, early_after_count=5), bounded)
  streaming = beam.Pipeline(options=PipelineOptions(['--streaming']))
  assert not batch_windows.applies(WindowSpec('fixed', size=60.0), streaming | beam.Create([1]))


@pytest.mark.parametrize(
  'spec',
  [
    WindowSpec('fixed', size=7.5),
    WindowSpec('sliding', size=10.0, period=3.0),
    WindowSpec('sliding', size=10.0, period=4.0),
  ],
)
def test_window_starts_are_beams_assignment(spec):
  times = np.array([-12.3, -0.000001, 0.0, 2.9999999, 3.0, 9.99, 10.0, 123.456789])
  micros = np.array([beam.utils.timestamp.Timestamp.of(t).micros for t in times], np.int64)
  index, starts, size = batch_windows.window_starts(micros, spec)
  for i, t in enumerate(times):
    expected = sorted(w.start.micros for w in spec.assign(t))
    assert sorted(starts[index == i].tolist()) == expected, t
    assert all(w.end.micros - w.start.micros == size for w in spec.assign(t))


def test_read_event_blocks_gives_read_events_records_and_dead_letters(tmp_path):
  """A JSON-lines file read as EventBlocks into the batch path gives what
  ReadEvents + EventTimestamps + the streaming path give, dead letters included."""
  events = _events()[:600]
  lines = [json.dumps({'key': e.key, 'time': e.time, 'a': e.values[0], 'b': e.values[1]}) for e in events]
  lines[10:10] = ['{"key": "bad", "time": "noon", "a": 1, "b": 2}', 'not json\r', '']  # one CRLF line
  path = tmp_path / 'events.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  spec = EventSpec(value_fields=('a', 'b'))
  window = WindowSpec('sliding', size=60.0, period=25.0)
  with TestPipeline() as p:
    per_event = p | 'ReadEvents' >> ReadEvents(str(path), spec)
    blocks = p | 'ReadBlocks' >> ReadEventBlocks(str(path), spec, block_size=64)
    expected = (
      per_event.events | EventTimestamps() | 'Streaming' >> WindowedFeatures(window, route_late=False, batch_path=False)
    )
    actual = blocks.events | 'FromBlocks' >> WindowedFeatures(window, event_blocks=True)
    assert_that(
      _listed(actual.records, 'Blocks')
      | beam.Map(
        lambda a, exp: _matches(exp)(a) or len(a), exp=beam.pvalue.AsSingleton(_listed(expected.records, 'Events'))
      ),
      lambda n: _at_least(n, 50),
      label='SameRecords',
    )

    def letters(failed, label):
      return (
        failed
        | f'Letters{label}' >> beam.Map(lambda d: (d['key'], d['stage'], d['reason'], d['record']))
        | f'ListLetters{label}' >> beam.combiners.ToList()
        | f'Sort{label}' >> beam.Map(sorted, key=repr)
      )

    assert_that(
      letters(blocks.failed, 'Blocks')
      | beam.Map(
        lambda a, exp: (a == exp) and len(a), exp=beam.pvalue.AsSingleton(letters(per_event.failed, 'Events'))
      ),
      equal_to([3]),
      label='SameDeadLetters',
    )
