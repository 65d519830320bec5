"""Sequence parsing, assembly, ids, padding/bucketing and chunking, on real records."""

import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_dl.decoding import padding
from beam_dl.decoding.sequences import SequenceRecord
from beam_dl.features import hashing
from beam_dl.formats import events as events_lib
from beam_dl.formats import sequence_example as seq_format
from beam_dl.formats.events import EventSpec
from beam_dl.formats.sequence_example import SequenceSpec
from transforms import sequences as T

SPEC = SequenceSpec(num_features=2)


def _pipeline():
  return TestPipeline(runner='FnApiRunner')


def _seq_example(key, steps, label=None, ids=None, step_type='float'):
  """A SequenceExample built with TF's own protos (not our encoder)."""
  se = tf.train.SequenceExample()
  if key is not None:
    se.context.feature['key'].bytes_list.value.append(key.encode())
  if label is not None:
    se.context.feature['label'].int64_list.value.append(label)
  values = se.feature_lists.feature_list['values']
  for step in steps:
    f = values.feature.add()
    if step_type == 'float':
      f.float_list.value.extend(step)
    else:
      f.int64_list.value.extend(int(x) for x in step)
  if ids is not None:
    for i in ids:
      se.feature_lists.feature_list['ids'].feature.add().int64_list.value.append(i)
  return se.SerializeToString()


def _bad_records():
  """(serialized, expected reason fragment) for each kind of malformed record."""
  return [
    (_seq_example('ragged', [[1, 2], [3, 4, 5]]), 'step 1 has 3 values, expected 2'),
    (_seq_example('ints', [[1, 2]], step_type='int'), "Data types don't match"),
    (_seq_example(None, [[1, 2]]), "missing feature 'key'"),
    (_seq_example('noval', []), "'values' is missing or empty"),
    (_seq_example('misaligned', [[1, 2], [3, 4]], ids=[7]), "has 1 ids but 'values' has 2"),
    (b'\x0a\xff\xffnot a proto', 'Invalid protocol message'),
    (_seq_example('KEY', [[1, 2]]).replace(b'KEY', b'\xff\xfe\xfd'), "'key' has a bad value"),
  ]


def test_parse_sequence_examples_isolates_each_bad_record():
  good_a = _seq_example('a', [[1, 2], [3, 4]], label=1, ids=[10, 11])
  good_b = _seq_example('b', [[5, 6]])
  bad = _bad_records()
  records = [good_a] + [b for b, _ in bad] + [good_b]
  results = seq_format.parse_sequence_examples(records, SPEC)
  assert len(results) == len(records)
  assert results[0] == SequenceRecord('a', np.array([[1, 2], [3, 4]], np.float32), np.array([10, 11]), label=1)
  assert results[-1] == SequenceRecord('b', np.array([[5, 6]], np.float32))
  for result, (_, reason) in zip(results[1:-1], bad):
    assert isinstance(result, seq_format.SequenceParseError)
    assert reason in str(result)


def test_parse_sequence_examples_width_from_record_when_not_declared():
  [rec] = seq_format.parse_sequence_examples([_seq_example('w', [[1, 2, 3]])], SequenceSpec())
  assert rec.values.shape == (1, 3)


def test_parse_list_examples_flat_values():
  def example(key, values, ids=None):
    feats = {
      'key': tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
      'values': tf.train.Feature(float_list=tf.train.FloatList(value=values)),
    }
    if ids is not None:
      feats['ids'] = tf.train.Feature(int64_list=tf.train.Int64List(value=ids))
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()

  good, odd, misaligned = seq_format.parse_list_examples(
    [example('g', [1, 2, 3, 4], ids=[1, 2]), example('o', [1, 2, 3]), example('m', [1, 2], ids=[1, 2])], SPEC
  )
  np.testing.assert_array_equal(good.values, [[1, 2], [3, 4]])
  np.testing.assert_array_equal(good.ids, [1, 2])
  assert 'not a multiple of num_features=2' in str(odd)
  assert "has 2 ids but 'values' has 1 steps" in str(misaligned)


def test_encode_sequence_example_round_trips_through_tf_parser():
  rec = SequenceRecord('k', np.array([[0.5, 1.5], [2, 3], [4, 5]], np.float32), np.array([3, 1, 2]), label=4)
  ctx, seq = tf.io.parse_single_sequence_example(
    seq_format.encode_sequence_example(rec),
    {'key': tf.io.FixedLenFeature([], tf.string), 'label': tf.io.FixedLenFeature([], tf.int64)},
    {'values': tf.io.FixedLenSequenceFeature([2], tf.float32), 'ids': tf.io.FixedLenSequenceFeature([1], tf.int64)},
  )
  assert ctx['key'].numpy() == b'k' and ctx['label'].numpy() == 4
  np.testing.assert_array_equal(seq['values'].numpy(), rec.values)
  np.testing.assert_array_equal(seq['ids'].numpy()[:, 0], rec.ids)


def test_pad_batch_pre_and_post_with_masks():
  long = SequenceRecord('l', np.arange(10, dtype=np.float32).reshape(5, 2), np.arange(1, 6))
  short = SequenceRecord('s', np.ones((2, 2), np.float32), np.array([7, 8]), label=1)
  post = padding.pad_batch([long, short], 4, padding='post', truncating='pre')
  np.testing.assert_array_equal(post.mask, [[1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(post.ids, [[2, 3, 4, 5], [7, 8, 0, 0]])  # pre-truncation keeps the end
  np.testing.assert_array_equal(post.values[0, 0], [2, 3])
  np.testing.assert_array_equal(post.labels, [-1, 1])
  assert post.targets is None
  pre = padding.pad_batch([long, short], 4, padding='pre', truncating='post')
  np.testing.assert_array_equal(pre.mask, [[1, 1, 1, 1], [0, 0, 1, 1]])
  np.testing.assert_array_equal(pre.ids, [[1, 2, 3, 4], [0, 0, 7, 8]])
  np.testing.assert_array_equal(pre.lengths, [4, 2])
  assert pre.padding_fraction == pytest.approx(2 / 8)
  with pytest.raises(ValueError, match='pre" or "post'):
    padding.pad_batch([long], 4, padding='middle')


def test_buckets_and_chunks():
  assert padding.default_boundaries(100, 8) == (8, 16, 32, 64, 100)
  assert [padding.bucket_index(n, (8, 16, 32)) for n in (1, 8, 9, 32, 500)] == [0, 0, 1, 2, 2]
  with pytest.raises(ValueError):
    padding.check_boundaries((8, 8))
  rec = SequenceRecord('k', np.arange(7, dtype=np.float32)[:, None], np.arange(7))
  chunks = padding.chunk(rec, 3)
  assert [c.key for c in chunks] == ['k/0', 'k/1', 'k/2']
  assert [c.ids.tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6]]
  assert chunks[2].meta == {'source_key': 'k', 'chunk': 2, 'num_chunks': 3, 'start': 6}
  overlap = padding.chunk(rec, 4, stride=2, drop_remainder=True)
  assert [c.ids.tolist() for c in overlap] == [[0, 1, 2, 3], [2, 3, 4, 5]]


def test_hashing():
  tokens = [f'item{i}' for i in range(2000)]
  hashed = hashing.hash_ids(tokens, 50)
  assert hashed.min() >= 0 and hashed.max() < 50
  assert len(set(hashed.tolist())) == 50  # spreads over every bucket
  np.testing.assert_array_equal(hashed, hashing.hash_ids(tokens, 50))  # deterministic
  # TensorFlow's own FarmHash bucketing (what tft.hash_strings applies in a graph).
  np.testing.assert_array_equal(hashed, tf.strings.to_hash_bucket_fast(tokens, 50).numpy())


def test_events_json_and_csv_parsing_and_assembly():
  spec = EventSpec(
    value_fields=('x', 'y'),
    id_field='item',
    label_field='label',
    csv_columns=('key', 'time', 'x', 'y', 'item', 'label'),
  )
  later = events_lib.parse_json_event('{"key": "u", "time": 5, "x": 1, "y": 2, "item": "b", "label": 1}', spec)
  earlier = events_lib.parse_csv_event('u,2.5,3,4,a,', spec)
  rec = events_lib.assemble_sequence('u', [later, earlier])
  np.testing.assert_array_equal(rec.values, [[3, 4], [1, 2]])
  assert rec.meta['raw_ids'].tolist() == ['a', 'b'] and rec.label == 1
  for line, reason in [
    ('{"key": "u", "time": 1', 'bad JSON'),
    ('[1, 2]', 'expected an object'),
    ('{"time": 1, "x": 1, "y": 1, "item": "a"}', "missing field 'key'"),
    ('{"key": "u", "time": "soon", "x": 1, "y": 1, "item": "a"}', "field 'time' must be a number"),
  ]:
    with pytest.raises(events_lib.EventParseError, match=reason):
      events_lib.parse_json_event(line, spec)
  for line, reason in [
    ('u,1,2', '3 columns, expected 6'),
    ('u,1,nan,2,a,', 'not finite'),
    ('u,1,"2,3,a,', 'bad CSV row'),
  ]:
    with pytest.raises(events_lib.EventParseError, match=reason):
      events_lib.parse_csv_event(line, spec)


def _plain(rec):
  return (rec.key, rec.values.tolist(), None if rec.ids is None else rec.ids.tolist(), rec.label)


def test_read_sequence_examples_pipeline_with_dead_letters(tmp_path):
  path = os.path.join(tmp_path, 'seq.tfrecord')
  bad = _bad_records()
  with tf.io.TFRecordWriter(path) as writer:
    writer.write(_seq_example('a', [[1, 2], [3, 4]], label=0, ids=[5, 6]))
    for record, _ in bad:
      writer.write(record)
    writer.write(_seq_example('b', [[5, 6]], label=1))
  with _pipeline() as p:
    out = p | T.ReadSequenceExamples(path, SPEC)
    assert_that(
      out.parsed | beam.Map(_plain),
      equal_to([('a', [[1, 2], [3, 4]], [5, 6], 0), ('b', [[5, 6]], None, 1)]),
      label='parsed',
    )
    assert_that(
      out.failed | beam.Map(lambda d: (d['key'], d['stage'], d['reason'])),
      lambda got: _match_reasons(got, [r for _, r in bad]),
      label='failed',
    )


def _match_reasons(got, fragments):
  assert len(got) == len(fragments), got
  # Each dead letter keeps the record's own key when the record has a readable one.
  assert sorted(str(key) for key, _, _ in got) == sorted(
    ['ragged', 'ints', 'None', 'noval', 'misaligned', 'None', '\\xff\\xfe\\xfd']
  )
  for _key, stage, _reason in got:
    assert stage == 'parse'
  reasons = sorted(r for _, _, r in got)
  for fragment in fragments:
    assert any(fragment in r for r in reasons), (fragment, reasons)


def test_events_to_hashed_bucketed_batches_pipeline():
  spec = EventSpec(value_fields=('x',), id_field='item', label_field='label')
  lines = []
  for user, n in (('short', 3), ('mid', 6), ('long', 20)):
    for t in reversed(range(n)):  # out of order on purpose
      lines.append(json.dumps({'key': user, 'time': t, 'x': t, 'item': f'i{t}', 'label': 1}))
  lines += ['not json', '{"key": "x", "time": 1}']
  with _pipeline() as p:
    events = p | beam.Create(lines) | T.ParseEvents(spec)
    seqs = events.events | T.AssembleSequences(min_length=1)
    hashed = seqs.sequences | T.HashIds(num_buckets=1000)
    batches = hashed.sequences | T.BucketByLength((4, 8, 16), batch_size=4)
    assert_that(
      batches | beam.Map(lambda b: (b.values.shape, b.keys, b.mask.sum(axis=1).tolist(), b.values[0, :, 0].tolist())),
      equal_to(
        [
          ((1, 4, 1), ['short'], [3], [0, 1, 2, 0]),
          ((1, 8, 1), ['mid'], [6], [0, 1, 2, 3, 4, 5, 0, 0]),
          ((1, 16, 1), ['long'], [16], [float(t) for t in range(4, 20)]),
        ]
      ),
      label='batches',
    )
    expected_ids = hashing.hash_ids([f'i{t}' for t in range(3)], 1000).tolist()
    assert_that(
      hashed.sequences | beam.Filter(lambda r: r.key == 'short') | beam.Map(lambda r: r.ids.tolist()),
      equal_to([expected_ids]),
      label='ids',
    )
    assert_that(
      events.failed | beam.Map(lambda d: d['reason'].split(':')[0]),
      equal_to(['bad JSON', "missing field 'item'"]),
      label='failed',
    )


def test_csv_events_hashing_and_chunking_pipeline(tmp_path):
  spec = EventSpec(value_fields=('v',), id_field='item', csv_columns=('key', 'time', 'v', 'item'))
  rows = ['key,time,v,item', 'u1,1,0.5,apple', 'u1,2,1.5,pear', 'u1,3,2.5,apple', 'u3,1,1']
  path = tmp_path / 'events.csv'
  path.write_text('\n'.join(rows) + '\n')
  apple, pear = hashing.hash_ids(['apple', 'pear'], 100).tolist()
  no_raw_ids = SequenceRecord('bare', np.zeros((2, 1), np.float32))
  with _pipeline() as p:
    events = p | T.ReadEvents(str(path), spec, fmt='csv', skip_header_lines=1)
    seqs = events.events | T.AssembleSequences()
    seqs = (seqs.sequences, p | beam.Create([no_raw_ids])) | beam.Flatten()
    hashed = seqs | T.HashIds(num_buckets=100)
    chunks = hashed.sequences | T.ChunkSequences(window=2)
    assert_that(
      chunks | beam.Map(lambda r: (r.key, r.ids.tolist(), r.meta['chunk'])),
      equal_to([('u1/0', [apple, pear], 0), ('u1/1', [apple], 1)]),
      label='chunks',
    )
    assert_that(
      hashed.failed | beam.Map(lambda d: (d['key'], d['stage'])), equal_to([('bare', 'ids')]), label='ids_failed'
    )
    assert_that(
      events.failed | beam.Map(lambda d: (d['stage'], d['record'])),
      equal_to([('parse_event', 'u3,1,1')]),
      label='events_failed',
    )


def test_pad_sequences_fixed_length_pipeline():
  recs = [SequenceRecord(f'k{n}', np.full((n, 1), n, np.float32)) for n in (1, 3, 9)]
  with _pipeline() as p:
    batches = p | beam.Create(recs) | T.PadSequences(length=4, batch_size=8, padding='pre')
    assert_that(
      batches | beam.FlatMap(lambda b: [(k, m.tolist()) for k, m in zip(b.keys, b.mask)]),
      equal_to(
        [('k1', [False, False, False, True]), ('k3', [False, True, True, True]), ('k9', [True, True, True, True])]
      ),
    )


def test_assemble_sequences_per_session_window():
  spec = EventSpec(value_fields=('x',))
  times = [0, 2, 4, 100, 103]  # two sessions with a 10 s gap
  lines = [json.dumps({'key': 'u', 'time': t, 'x': t}) for t in times]
  with _pipeline() as p:
    events = p | beam.Create(lines) | T.ParseEvents(spec, with_timestamps=True)
    seqs = events.events | beam.WindowInto(beam.window.Sessions(10)) | T.AssembleSequences()
    assert_that(seqs.sequences | beam.Map(lambda r: r.values[:, 0].tolist()), equal_to([[0, 2, 4], [100, 103]]))


def test_parse_sequence_examples_error_handler_and_threshold():
  """Beam's error-handling conventions: under the threshold the job succeeds
  and Beam's ErrorHandler receives every dead letter; above it the job fails
  saying how many records failed."""
  from apache_beam.transforms.error_handling import ErrorHandler

  bad = [b for b, _ in _bad_records()]  # 7 bad records
  good = [_seq_example(f'g{i}', [[i, i]]) for i in range(13)]
  p = _pipeline()
  with ErrorHandler(beam.Map(lambda d: d['stage'])) as handler:
    out = p | beam.Create(good + bad) | T.ParseSequenceExamples(SPEC, error_threshold=0.4).with_error_handler(handler)
  assert_that(out.parsed | beam.Map(lambda r: r.key), equal_to([f'g{i}' for i in range(13)]), label='parsed')
  assert_that(handler.output(), equal_to(['parse'] * 7), label='handled')
  p.run().wait_until_finish()  # 7 of 20 = 35% <= 40%

  p = _pipeline()
  _ = p | beam.Create(good[:3] + bad) | T.ParseSequenceExamples(SPEC, error_threshold=0.5)
  with pytest.raises(Exception, match=r'7 of 10 inputs failed \(70\.0%\), above the error threshold of 50\.0%'):
    p.run().wait_until_finish()


def test_events_cross_a_shuffle_as_fields_not_pickles():
  coder = beam.coders.registry.get_coder(events_lib.Event)
  assert isinstance(coder, events_lib.EventCoder)
  event = events_lib.Event('user-1', 12.5, (1.0, -2.0), id='item', label=1)
  encoded = coder.encode(event)
  assert coder.decode(encoded) == event and b'beam_dl' not in encoded  # no pickled class path
