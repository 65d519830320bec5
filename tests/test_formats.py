"""beam_dl.formats: the record formats' encoders and parsers, against records
written before the formats had one home (tests/data/formats) and each other."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from beam_dl.decoding.images import ImageDecodeError, ImageSpec, decode_image, fit_image
from beam_dl.decoding.sequences import SequenceRecord
from beam_dl.formats import image_example, sequence_example
from beam_dl.formats.sequence_example import SequenceSpec

DATA = os.path.join(os.path.dirname(__file__), 'data', 'formats')


def _records(name):
  return [r.numpy() for r in tf.data.TFRecordDataset(os.path.join(DATA, name))]


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, 'PNG')
  return buffer.getvalue()


def _same_proto(proto, a: bytes, b: bytes) -> bool:
  """Same message content (map order may differ between serializations)."""
  return proto.FromString(a) == proto.FromString(b)


@pytest.fixture(scope='module')
def golden():
  """The arrays the golden records were written from, drawn again in the same order.

  tests/data/formats/*.tfrecord were written at commit 1bb4010 by the encoders
  of that time: beam_dl.io.examples.encode_image_example,
  beam_dl.decoding.sequences.encode_sequence_example, training.datasets'
  image_example / sequence_example, and hand-built image/encoded Examples
  (as the tests wrote them), from np.random.default_rng(12).
  """
  rng = np.random.default_rng(12)
  return {
    'rgb': rng.integers(0, 256, (3, 4, 3), dtype=np.uint8),
    'gray2d': rng.integers(0, 256, (2, 5), dtype=np.uint8),
    'digits/0': rng.integers(0, 17, (8, 8, 1), dtype=np.uint8),
    'png_rgb': rng.integers(0, 256, (3, 4, 3), dtype=np.uint8),
    'png_gray': rng.integers(0, 256, (5, 2), dtype=np.uint8),
  }


def test_pixel_records_written_before_still_read_and_encode_the_same(golden):
  records = _records('image_pixels.tfrecord')
  want = [('rgb', golden['rgb'], 7), ('gray2d', golden['gray2d'][..., None], -1), ('digits/0', golden['digits/0'], 4)]
  got = image_example.decode_image_examples(records)
  assert [(k, label) for k, _, label in got] == [(k, label) for k, _, label in want]
  for (_, pixels, _), (_, image, _) in zip(got, want):
    np.testing.assert_array_equal(pixels, image)
  for record, (key, image, label) in zip(records, want):
    parsed = image_example.parse_image_example(record)
    assert (parsed.key, parsed.label, parsed.encoded) == (key, label, None)
    np.testing.assert_array_equal(parsed.pixels, image)
    new = image_example.encode_image_example(key, image, None if label == -1 else label)
    assert _same_proto(tf.train.Example, record, new)
  # The training side reads them too (one shape per batch, as a DataConfig declares).
  parsed = image_example.parse_pixels(tf.constant(records[:1]), (3, 4, 3))
  np.testing.assert_array_equal(parsed['image'].numpy()[0], golden['rgb'])
  assert parsed['label'].numpy().tolist() == [7]


def test_encoded_records_written_before_still_read_and_encode_the_same(golden):
  records = _records('image_encoded.tfrecord')
  for record, (key, label) in zip(records, [('png_rgb', 5), ('png_gray', None)]):
    parsed = image_example.parse_image_example(record)
    assert (parsed.key, parsed.label, parsed.pixels) == (key, label, None)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(parsed.encoded))), golden[key])
    assert _same_proto(tf.train.Example, record, image_example.encode_file_example(key, parsed.encoded, label))


def test_sequence_records_written_before_still_read_and_encode_the_same():
  records = _records('sequence.tfrecord')
  want = [
    SequenceRecord('labelled', np.arange(6, dtype=np.float32).reshape(3, 2) / 4, np.array([3, 1, 4]), label=2),
    SequenceRecord('regress', np.ones((2, 1), np.float32), target=np.array([0.5, -1.25], np.float32)),
    SequenceRecord('co2/0', np.arange(4, dtype=np.float32).reshape(2, 2), target=0.75),
    SequenceRecord('ids', np.ones((3, 2), np.float32), np.array([9, 8, 7]), label=1),
  ]
  assert sequence_example.parse_sequence_examples(records, SequenceSpec()) == want
  for record, expected in zip(records, want):
    assert _same_proto(tf.train.SequenceExample, record, sequence_example.encode_sequence_example(expected))
  # The training side: fixed-width steps, ids and the declared target.
  parsed = sequence_example.parse_single(records[3], 2, with_ids=True)
  np.testing.assert_array_equal(parsed[sequence_example.VALUES].numpy(), np.ones((3, 2)))
  assert parsed[sequence_example.IDS].numpy()[:, 0].tolist() == [9, 8, 7]
  assert int(parsed[sequence_example.LABEL]) == 1
  parsed = sequence_example.parse_single(records[1], 1, with_ids=False, target='target', num_targets=2)
  assert parsed[sequence_example.TARGET].numpy().tolist() == [0.5, -1.25]


def test_parse_image_example_reasons_and_keys():
  pixels = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
  good = image_example.encode_image_example('k', pixels, 3)
  example = tf.train.Example.FromString(good)
  example.features.feature[image_example.RAW].bytes_list.value[0] = b'short'
  cut = example.SerializeToString()
  example.features.feature[image_example.SHAPE].int64_list.value.append(1)
  four_dims = example.SerializeToString()
  cases = {
    b'\xff\x00garbage': ('not a tf.train.Example', None),
    tf.train.Example().SerializeToString(): ("1 bytes value in feature 'image/encoded', found 0", None),
    cut: ('image/raw has 5 bytes, image/shape (2, 2, 3) needs 12', 'k'),
    four_dims: ('image/shape (2, 2, 3, 1) is not [H, W, C]', 'k'),
  }
  for record, (reason, key) in cases.items():
    with pytest.raises(image_example.ImageExampleError) as e:
      image_example.parse_image_example(record)
    assert reason in str(e.value) and e.value.key == key
  # A custom key/label/image feature first, then the pixel layout's own names.
  custom = tf.train.Example.FromString(image_example.encode_file_example(None, b'png', None))
  custom.features.feature['id'].bytes_list.value.append(b'mine')
  custom.features.feature['key'].bytes_list.value.append(b'other')
  parsed = image_example.parse_image_example(custom.SerializeToString(), key_feature='id')
  assert (parsed.key, parsed.label, parsed.encoded) == ('mine', None, b'png')
  with pytest.raises(ValueError, match='does not fit int64'):
    image_example.encode_image_example('k', pixels, 2**63)
  with pytest.raises(ValueError, match='must be uint8'):
    image_example.encode_image_example('k', pixels.astype(np.float32))


@pytest.mark.parametrize('channels', [1, 2, 3, 4])
@pytest.mark.parametrize(
  'spec',
  [
    ImageSpec(),
    ImageSpec(5, 7, channels=1),
    ImageSpec(6, 6, fit='cover'),
    ImageSpec(4, 9, fit='contain', background=(255, 0, 0)),
    ImageSpec(3, 3, channels=1, fit='cover', crop='random', seed=4),
  ],
)
def test_fit_image_equals_decoding_a_lossless_file_of_the_same_pixels(channels, spec):
  rng = np.random.default_rng(channels)
  pixels = rng.integers(0, 256, (9, 11, channels), dtype=np.uint8)
  if channels % 2 == 0:  # some transparency to composite
    pixels[..., -1] = rng.choice([0, 128, 255], size=pixels.shape[:2])
  png = _png(pixels[..., 0] if channels == 1 else pixels)
  crop_rng = (lambda: np.random.default_rng(7)) if spec.crop == 'random' else (lambda: None)
  np.testing.assert_array_equal(fit_image(pixels, spec, crop_rng()), decode_image(png, spec, crop_rng()))


def test_fit_image_refuses_what_is_not_uint8_pixels():
  for bad, kind in (
    (np.zeros((2, 2, 3), np.float32), 'unsupported'),
    (np.zeros((2, 2, 5), np.uint8), 'unsupported'),
    (np.zeros((0, 4, 3), np.uint8), 'empty'),
    (np.zeros((9, 9, 3), np.uint8), 'too_many_pixels'),
  ):
    with pytest.raises(ImageDecodeError) as e:
      fit_image(bad, ImageSpec(max_pixels=80))
    assert e.value.kind == kind


def test_own_key_of_records_that_fail_to_parse():
  record = sequence_example.encode_sequence_example(SequenceRecord('mine', np.ones((2, 3), np.float32)))
  [error] = sequence_example.parse_sequence_examples([record], SequenceSpec(num_features=2))
  assert isinstance(error, sequence_example.SequenceParseError)
  assert sequence_example.own_key(record) == 'mine'
  assert sequence_example.own_key(b'\xff\x00garbage') is None
