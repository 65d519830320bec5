"""Dirty data never crashes a pipeline: every bad input is one dead letter, every good one comes out.

Real bytes throughout: TFRecords written by tf.io.TFRecordWriter and then
damaged (a flipped data byte, a file cut mid-record), real directories,
dangling symlinks and FIFOs matching the input glob, a file whose read fails
with EIO (a symlink to /proc/self/mem: reading its offset 0 is an I/O error
even as root, where chmod 000 would not stop a read), TIFFs written by
tifffile, event lines with bad UTF-8 and microsecond times. Each case goes
through the real pipeline (`classify_images.run`, `preprocess.run`,
`score_sequences.run`) on a local runner.
"""

from __future__ import annotations

import io
import json
import logging
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
import tifffile
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_dl.formats.events import EventSpec
from beam_dl.formats.image_example import encode_file_example, encode_image_example
from beam_dl.formats.jsonl import read_jsonl
from beam_dl.io import tfrecord
from tests.imaging import digits_uint8, encode
from transforms import sequences as seq_transforms
from transforms.tfrecords import ReadTFRecords

AS_ROOT = os.geteuid() == 0


# -- TFRecord files, written by TensorFlow, then damaged ----------------------


def write_tfrecord(path: str, records: list[bytes]) -> list[int]:
  """Writes `records` with TF's writer; returns each frame's byte offset."""
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
  offsets, at = [], 0
  for record in records:
    offsets.append(at)
    at += 16 + len(record)
  assert os.path.getsize(path) == at
  return offsets


def flip_data_byte(path: str, offset: int) -> None:
  """Corrupts one byte inside the data of the frame at `offset` (length header intact)."""
  with open(path, 'r+b') as f:
    f.seek(offset + 12 + 3)
    byte = f.read(1)
    f.seek(offset + 12 + 3)
    f.write(bytes([byte[0] ^ 0xFF]))


def cut_mid_record(path: str, offset: int) -> None:
  """Truncates the file half-way through the data of the frame at `offset`."""
  with open(path, 'r+b') as f:
    f.seek(offset)
    length = int.from_bytes(f.read(8), 'little')
    f.truncate(offset + 12 + length // 2)


def test_framing_matches_tensorflow_and_reports_each_damage(tmp_path):
  records = [f'record-{i}'.encode() * (i + 1) for i in range(5)]
  path = str(tmp_path / 'r.tfrecord')
  offsets = write_tfrecord(path, records)
  with open(path, 'rb') as f:
    whole = f.read()
  assert whole == b''.join(tfrecord.encode_record(r) for r in records)
  assert list(tfrecord.read_records(io.BytesIO(whole))) == records

  flip_data_byte(path, offsets[1])
  flip_data_byte(path, offsets[3])
  with open(path, 'rb') as f:
    got = list(tfrecord.read_records(f))
  damage = [g for g in got if isinstance(g, tfrecord.Damage)]
  assert [g for g in got if isinstance(g, bytes)] == [records[0], records[2], records[4]]
  assert [(d.offset, d.recoverable) for d in damage] == [(offsets[1], True), (offsets[3], True)]
  assert all('data CRC mismatch' in d.reason for d in damage)

  cut_mid_record(path, offsets[4])
  with open(path, 'rb') as f:
    got = list(tfrecord.read_records(f))
  assert got[-1].offset == offsets[4] and not got[-1].recoverable
  assert 'truncated' in got[-1].reason

  header_cut = io.BytesIO(whole[: offsets[2] + 5])
  *good, last = tfrecord.read_records(header_cut)
  assert good == records[:2] and last.offset == offsets[2] and 'mid-header' in last.reason

  bad_length = bytearray(whole)
  bad_length[offsets[2]] ^= 0x01  # the length field: its CRC no longer matches
  *good, last = tfrecord.read_records(io.BytesIO(bytes(bad_length)))
  assert good == records[:2] and 'length CRC mismatch' in last.reason and not last.recoverable


def test_read_tfrecords_reads_gzip_and_reports_a_cut_stream(tmp_path):
  records = [b'a' * 100, b'b' * 200, b'c' * 300]
  good = str(tmp_path / 'good.tfrecord.gz')
  with tf.io.TFRecordWriter(good, tf.io.TFRecordOptions(compression_type='GZIP')) as writer:
    for r in records:
      writer.write(r)
  with open(good, 'rb') as f:
    blob = f.read()
  with open(tmp_path / 'cut.tfrecord.gz', 'wb') as f:
    f.write(blob[: len(blob) - 20])  # a gzip stream that ends early
  with TestPipeline(runner='FnApiRunner') as p:
    read = p | ReadTFRecords(str(tmp_path / '*.tfrecord.gz'))
    assert_that(
      read.records | beam.Map(lambda fr: (os.path.basename(fr[0]), len(fr[1]))),
      equal_to(
        [
          ('good.tfrecord.gz', 100),
          ('good.tfrecord.gz', 200),
          ('good.tfrecord.gz', 300),
          ('cut.tfrecord.gz', 100),
          ('cut.tfrecord.gz', 200),
        ]
      ),
      label='records',
    )
    # The stream decompresses up to the cut: the third frame is short, at its
    # offset in the decompressed stream.
    assert_that(
      read.failed
      | beam.Map(
        lambda d: (os.path.basename(d['key']), d['stage'], 'gzip-decompressed byte 332: truncated' in d['reason'])
      ),
      equal_to([('cut.tfrecord.gz@332', 'read', True)]),
      label='failed',
    )


# -- classify_images ------------------------------------------------------------


def test_classify_images_keeps_good_records_around_damaged_tfrecords(digits_model_dir, tmp_path):
  from pipelines import classify_images

  images, _ = digits_uint8()
  keys = [f'a{i}' for i in range(5)] + [f'b{i}' for i in range(4)]
  blobs = {k: encode(images[i], 'PNG') for i, k in enumerate(keys)}
  a = str(tmp_path / 'a.tfrecord')
  a_offsets = write_tfrecord(a, [encode_file_example(k, blobs[k]) for k in keys[:5]])
  flip_data_byte(a, a_offsets[2])  # a2 lost; a3, a4 after it are still read
  b = str(tmp_path / 'b.tfrecord')
  b_offsets = write_tfrecord(b, [encode_file_example(k, blobs[k]) for k in keys[5:]])
  cut_mid_record(b, b_offsets[2])  # b2 cut short; b3 beyond it cannot be framed
  out = str(tmp_path / 'pred')
  classify_images.run(
    [f'--input={tmp_path}/*.tfrecord', f'--model_dir={digits_model_dir}', f'--output={out}', '--runner=FnApiRunner']
  )
  predictions, failed = read_jsonl(out + '-[0-9]*.jsonl'), read_jsonl(out + '_failed-*.jsonl')
  assert sorted(r['key'] for r in predictions) == ['a0', 'a1', 'a3', 'a4', 'b0', 'b1']
  assert sorted((f['key'], f['stage'], f['file'], f['offset']) for f in failed) == [
    (f'{a}@{a_offsets[2]}', 'read', a, a_offsets[2]),
    (f'{b}@{b_offsets[2]}', 'read', b, b_offsets[2]),
  ]
  reasons = {f['file']: f['reason'] for f in failed}
  assert 'data CRC mismatch' in reasons[a] and f'byte {a_offsets[2]}' in reasons[a]
  assert 'truncated' in reasons[b] and f'byte {b_offsets[2]}' in reasons[b]


def tiff(array: np.ndarray, **kwargs) -> bytes:
  buffer = io.BytesIO()
  tifffile.imwrite(buffer, array, **kwargs)
  return buffer.getvalue()


def unsupported_compression_tiff() -> bytes:
  """A real 16-bit TIFF whose Compression tag says JPEG 2000 (needs imagecodecs)."""
  blob = bytearray(tiff(np.zeros((8, 8), np.uint16)))
  with tifffile.TiffFile(io.BytesIO(bytes(blob))) as t:
    at = t.pages.first.tags['Compression'].valueoffset
  blob[at : at + 2] = (34712).to_bytes(2, 'little')
  return bytes(blob)


@pytest.mark.timeout(600)  # a FIFO that were opened would block: fail, don't hang
def test_classify_images_reports_every_unreadable_match_and_decodes_tiffs(digits_model_dir, tmp_path):
  """Image files: real TIFFs decode to the same digit as the PNG; every entry that
  matches the glob but can't be read is one 'read' dead letter."""
  from pipelines import classify_images
  from tests.test_classify_images import direct_labels

  images, _ = digits_uint8()
  digit = images[-1]
  inputs = tmp_path / 'in'
  inputs.mkdir()
  good = {
    'digit.png': encode(digit, 'PNG'),
    'digit16.tif': tiff(digit.astype(np.uint16) * 257),  # 0..65535: the dtype range
    'digit_float.tif': tiff(digit.astype(np.float32) / 255),  # float in [0, 1]
    'digit_pages.tif': tiff(np.stack([digit, 255 - digit, digit // 2]), photometric='minisblack'),
  }
  for name, blob in good.items():
    (inputs / name).write_bytes(blob)
  (inputs / 'jp2k.tif').write_bytes(unsupported_compression_tiff())
  (inputs / 'folder.png').mkdir()
  (inputs / 'dangling.png').symlink_to(tmp_path / 'gone.png')
  os.mkfifo(inputs / 'pipe.png')
  (inputs / 'eio.png').symlink_to('/proc/self/mem')  # read() at offset 0 raises EIO
  unreadable = {
    'folder.png': 'directory',
    'dangling.png': 'dangling symlink',
    'pipe.png': 'FIFO',
    'eio.png': 'Input/output error',
  }
  if not AS_ROOT:  # root reads through chmod 000
    (inputs / 'locked.png').write_bytes(good['digit.png'])
    os.chmod(inputs / 'locked.png', 0)
    unreadable['locked.png'] = 'Permission denied'
  out = str(tmp_path / 'pred')
  classify_images.run(
    [f'--input={inputs}/*', f'--model_dir={digits_model_dir}', f'--output={out}', '--runner=FnApiRunner']
  )
  predictions, failed = read_jsonl(out + '-[0-9]*.jsonl'), read_jsonl(out + '_failed-*.jsonl')
  label = direct_labels(digits_model_dir, {'digit': good['digit.png']})['digit']
  assert {os.path.basename(r['key']): r['label'] for r in predictions} == {n: label for n in good}
  by_name = {os.path.basename(f['key']): f for f in failed}
  assert len(by_name) == len(failed) == len(unreadable) + 1
  for name, words in unreadable.items():
    assert by_name[name]['stage'] == 'read' and words in by_name[name]['reason'], by_name[name]
  assert by_name['jp2k.tif']['stage'] == 'decode'
  assert by_name['jp2k.tif']['reason'].startswith('unsupported TIFF compression')
  assert 'JPEG2000' in by_name['jp2k.tif']['reason']


# -- preprocess -----------------------------------------------------------------


@pytest.mark.slow
def test_preprocess_tfrecords_and_files_dead_letters_are_counted_and_keyed(tmp_path, caplog):
  from beam_dl.training import input_pipeline
  from pipelines import preprocess

  images, labels = digits_uint8()
  good = [encode_image_example(f'img{i}', images[i][..., None], int(labels[i])) for i in range(12)]
  wrong_shape = encode_image_example('img-wrong-shape', np.zeros((4, 4, 1), np.uint8), 1)
  path = str(tmp_path / 'in' / 'part-0.tfrecord')
  os.makedirs(os.path.dirname(path))
  offsets = write_tfrecord(path, good[:6] + [wrong_shape] + good[6:])
  flip_data_byte(path, offsets[3])  # img3 lost, the rest read
  cut = str(tmp_path / 'in' / 'part-1.tfrecord')
  cut_offsets = write_tfrecord(cut, good[:2])
  cut_mid_record(cut, cut_offsets[1])  # img0 again (same key, second file), img1 cut
  transform_dir, output = str(tmp_path / 'transform'), str(tmp_path / 'out' / 'train')
  with caplog.at_level(logging.INFO, logger='beam_dl.preprocess'):
    preprocess.run(
      [
        f'--input={tmp_path}/in/*.tfrecord',
        f'--transform_dir={transform_dir}',
        f'--output={output}',
        '--preprocess_image_shape=8,8,1',
        '--runner=FnApiRunner',
      ]
    )
  failed = read_jsonl(output + '_failed-*.jsonl')
  assert sorted((f['key'], f['stage']) for f in failed) == sorted(
    [(f'{path}@{offsets[3]}', 'read'), (f'{cut}@{cut_offsets[1]}', 'read'), ('img-wrong-shape', 'parse')]
  )
  records = input_pipeline.transformed_examples(transform_dir, output + '-0*.tfrecord')
  assert sorted(records) == sorted({f'img{i}' for i in range(12)} - {'img3'})
  assert any('(3 dead letters)' in m for m in caplog.messages), caplog.messages


@pytest.mark.slow
def test_preprocess_files_label_beyond_int64_and_unreadable_matches(tmp_path, caplog):
  from pipelines import preprocess

  images, _ = digits_uint8()
  inputs = tmp_path / 'in'
  inputs.mkdir()
  for i in range(6):
    (inputs / f'digit_{i}_label{i}.png').write_bytes(encode(images[i], 'PNG'))
  (inputs / f'digit_big_label{2**64}.png').write_bytes(encode(images[7], 'PNG'))
  (inputs / 'sub.png').mkdir()
  (inputs / 'gone.png').symlink_to(tmp_path / 'nowhere.png')
  transform_dir, output = str(tmp_path / 'transform'), str(tmp_path / 'out' / 'train')
  with caplog.at_level(logging.INFO, logger='beam_dl.preprocess'):
    preprocess.run(
      [
        f'--input={inputs}/*.png',
        f'--transform_dir={transform_dir}',
        f'--output={output}',
        '--preprocess_image_shape=8,8,1',
        '--runner=FnApiRunner',
      ]
    )
  failed = {os.path.basename(f['key']): f for f in read_jsonl(output + '_failed-*.jsonl')}
  assert sorted(failed) == sorted([f'digit_big_label{2**64}.png', 'sub.png', 'gone.png'])
  assert failed[f'digit_big_label{2**64}.png']['stage'] == 'canonical'
  assert 'does not fit int64' in failed[f'digit_big_label{2**64}.png']['reason']
  assert failed['sub.png']['stage'] == failed['gone.png']['stage'] == 'read'
  assert any('(3 dead letters)' in m for m in caplog.messages), caplog.messages


# -- events -----------------------------------------------------------------------


def test_event_labels_beyond_int64_are_dead_letters_with_their_key():
  spec = EventSpec(value_fields=('v',), label_field='label')
  lines = [
    json.dumps({'key': 'ok', 'time': 1, 'v': 1.0, 'label': 3}),
    json.dumps({'key': 'huge', 'time': 1, 'v': 1.0, 'label': 2**63}),
    json.dumps({'key': 'frac', 'time': 1, 'v': 1.0, 'label': 2.5}),
  ]
  with TestPipeline(runner='FnApiRunner') as p:
    events = p | beam.Create(lines) | seq_transforms.ParseEvents(spec)
    seqs = events.events | seq_transforms.AssembleSequences()
    assert_that(seqs.sequences | beam.Map(lambda r: (r.key, r.label)), equal_to([('ok', 3)]), label='sequences')
    assert_that(
      seqs.failed | beam.Map(lambda d: (d['key'], d['stage'], 'int' in d['reason'])),
      equal_to([('huge', 'assemble', True), ('frac', 'assemble', True)]),
      label='failed',
    )


@pytest.mark.slow
def test_score_sequences_survives_microsecond_times_and_bad_utf8(tmp_path):
  from pipelines import score_sequences
  from pipelines import score_sequences_demo as demo

  model_dir = str(tmp_path / 'model')
  demo.train_model(model_dir, demo.load_series()[1][:120], steps=2, cell='gru')
  start = 1_700_000_000
  lines = [json.dumps({'key': 'k', 'time': start + 60 * i, 'v': float(i)}).encode() for i in range(20)]
  lines.insert(5, json.dumps({'key': 'k', 'time': 1.7e15, 'v': 1.0}).encode())  # microseconds
  lines.insert(9, b'{"key": "k\xff\xfe", "time": 1700000000, "v": 1.0}')  # not UTF-8
  lines.insert(12, json.dumps({'key': 'other', 'time': -1e300, 'v': 1.0}).encode())
  events = tmp_path / 'events.jsonl'
  events.write_bytes(b'\n'.join(lines) + b'\n')
  out = str(tmp_path / 'scores')
  score_sequences.run(
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
      'v',
      '--window',
      'fixed',
      '--window_size',
      '3600',
      '--seq_len',
      '64',
    ]
  )
  scores, failed = read_jsonl(f'{out}-0*.jsonl'), read_jsonl(f'{out}_failed-*.jsonl')
  assert [(s['key'], s['length']) for s in scores] == [('k', 20)]  # every good event scored
  bad = [(f['key'], f['stage'], f['reason'].split(':')[0]) for f in failed]
  assert sorted(bad, key=repr) == sorted(
    [
      (
        'k',
        'parse_event',
        "field 'time' = 1700000000000000.0 is outside Beam's timestamp range "
        '[-9.22337e+12, 9.22337e+12] seconds (milli- or microseconds sent as seconds?)',
      ),
      (None, 'parse_event', 'not valid UTF-8'),
      (
        'other',
        'parse_event',
        "field 'time' = -1e+300 is outside Beam's timestamp range "
        '[-9.22337e+12, 9.22337e+12] seconds (milli- or microseconds sent as seconds?)',
      ),
    ],
    key=repr,
  )


def test_read_sequence_examples_keeps_records_around_damage_and_keys_bad_ones(tmp_path):
  from beam_dl.decoding.sequences import SequenceRecord
  from beam_dl.formats.sequence_example import SequenceSpec, encode_sequence_example

  spec = SequenceSpec(num_features=2)
  records = [SequenceRecord(f'r{i}', np.full((i + 1, 2), i, np.float32), np.arange(i + 1)) for i in range(4)]
  wide = SequenceRecord('wide', np.zeros((2, 3), np.float32), np.arange(2))  # 3 values a step, not 2
  path = str(tmp_path / 'seq.tfrecord')
  offsets = write_tfrecord(path, [encode_sequence_example(r) for r in records[:2] + [wide] + records[2:]])
  flip_data_byte(path, offsets[1])
  with TestPipeline(runner='FnApiRunner') as p:
    read = p | seq_transforms.ReadSequenceExamples(path, spec)
    assert_that(read.parsed | beam.Map(lambda r: r.key), equal_to(['r0', 'r2', 'r3']), label='parsed')
    assert_that(
      read.failed | beam.Map(lambda d: (d['key'], d['stage'])),
      equal_to([(f'{path}@{offsets[1]}', 'read'), ('wide', 'parse')]),
      label='failed',
    )
