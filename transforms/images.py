"""Public PTransforms that read and decode images.

  ReadImageFiles(pattern)      -> (path, encoded bytes)
  ReadImageExamples(pattern)   -> (key, encoded bytes) from TFRecords of
                                  tf.train.Example, plus `.failed`
  DecodeImages(spec)           -> `.decoded` (key, uint8 HWC array), `.failed`
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from beam_dl.deadletter import FAILED, dead_letter, describe
from beam_dl.io.images import ImageDecodeError, ImageSpec, decode_image

_NAMESPACE = 'beam_dl.images'


class ReadImageFiles(beam.PTransform):
  """Reads every file matching `file_pattern` as (path, bytes)."""

  def __init__(self, file_pattern: str):
    super().__init__()
    self._file_pattern = file_pattern

  def expand(self, pbegin):
    return (
        pbegin
        | 'MatchFiles' >> fileio.MatchFiles(self._file_pattern)
        | 'ReadMatches' >> fileio.ReadMatches()
        | 'ToKeyedBytes'
        >> beam.Map(lambda f: (f.metadata.path, f.read())).with_output_types(tuple[str, bytes])
    )


class _ParseImageExampleFn(beam.DoFn):
  """(filename, serialized tf.train.Example) -> (key, encoded image bytes)."""

  def __init__(self, image_feature: str, key_feature: str):
    self._image_feature = image_feature
    self._key_feature = key_feature
    self._failed = Metrics.counter(_NAMESPACE, 'examples_failed')

  def setup(self):
    import tensorflow as tf  # on workers only: TF import is slow

    self._parse = tf.train.Example.FromString

  def process(self, element: tuple[str, bytes]) -> Iterable:
    filename, record = element
    fallback_key = f'{filename}@sha1:{hashlib.sha1(record).hexdigest()[:16]}'
    try:
      features = self._parse(record).features.feature
    except Exception as e:  # protobuf raises DecodeError, a bare Exception
      self._failed.inc()
      yield beam.pvalue.TaggedOutput(
          FAILED, dead_letter(fallback_key, 'parse', f'not a tf.train.Example: {describe(e)}')
      )
      return
    key = fallback_key
    if self._key_feature in features and features[self._key_feature].bytes_list.value:
      key = features[self._key_feature].bytes_list.value[0].decode('utf-8', 'replace')
    encoded = features[self._image_feature].bytes_list.value if self._image_feature in features else []
    if len(encoded) != 1:
      self._failed.inc()
      yield beam.pvalue.TaggedOutput(
          FAILED,
          dead_letter(key, 'parse', f'expected 1 bytes value in feature {self._image_feature!r}, found {len(encoded)}'),
      )
      return
    yield key, encoded[0]


class ReadImageExamples(beam.PTransform):
  """Reads (key, encoded image) from TFRecord files of tf.train.Example.

  The key is the `key_feature` value, or `<file>@sha1:<digest>` of the record
  when absent. Records that are not Examples or lack the image feature go to
  `.failed`.
  """

  def __init__(
      self,
      file_pattern: str,
      image_feature: str = 'image/encoded',
      key_feature: str = 'image/key',
  ):
    super().__init__()
    self._file_pattern = file_pattern
    self._image_feature = image_feature
    self._key_feature = key_feature

  def expand(self, pbegin):
    return (
        pbegin
        | 'Pattern' >> beam.Create([self._file_pattern])
        | 'ReadRecords' >> beam.io.ReadAllFromTFRecord(with_filename=True)
        | 'ParseExamples'
        >> beam.ParDo(_ParseImageExampleFn(self._image_feature, self._key_feature)).with_outputs(
            FAILED, main='images'
        )
    )


class _DecodeImageFn(beam.DoFn):
  """(key, bytes) -> (key, array); undecodable inputs -> FAILED with reason."""

  def __init__(self, spec: ImageSpec):
    self._spec = spec
    self._decoded = Metrics.counter(_NAMESPACE, 'decoded')
    self._failed = Metrics.counter(_NAMESPACE, 'failed')
    self._bytes = Metrics.distribution(_NAMESPACE, 'encoded_bytes')

  def process(self, element: tuple[str, bytes]) -> Iterable:
    key, data = element
    self._bytes.update(len(data))
    try:
      array = decode_image(data, self._spec)
    except ImageDecodeError as e:
      self._failed.inc()
      Metrics.counter(_NAMESPACE, f'failed_{e.kind}').inc()
      yield beam.pvalue.TaggedOutput(FAILED, dead_letter(key, 'decode', str(e)))
      return
    self._decoded.inc()
    yield key, array



class DecodeImages(beam.PTransform):
  """Decodes (key, encoded bytes) to (key, uint8 [H, W, C]) per `spec`.

  Returns a tuple with `.decoded` and `.failed` (dead letters with key and
  reason); every input lands in exactly one of them.
  """

  def __init__(self, spec: ImageSpec = ImageSpec()):
    super().__init__()
    self._spec = spec

  def expand(self, pcoll):
    return pcoll | 'Decode' >> beam.ParDo(_DecodeImageFn(self._spec)).with_outputs(
        FAILED, main='decoded'
    )


__all__ = ['DecodeImages', 'ImageSpec', 'ReadImageExamples', 'ReadImageFiles']
