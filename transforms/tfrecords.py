"""Write prepared examples as sharded TFRecord files for the training input pipeline.

  decoded.decoded | WriteImageExamples('out/train', labels=...)  -> out/train-00000-of-00004.tfrecord
  seqs | WriteSequenceExamples('out/seq')

Formats are the shared on-disk ones: image tf.train.Example (`image/raw`,
`image/shape`, `label`, `key`) and sequence tf.train.SequenceExample (context
`key`/`label`/`target`, feature lists `values`/`ids`). Both transforms return
the written file names (what `WriteToTFRecord` returns).
"""
from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_dl.io import examples as examples_lib
from beam_dl.io import sequences as seq_lib
from beam_dl.io.sequences import SequenceRecord, SequenceSpec

NAMESPACE = 'beam_dl.tfrecords'
SUFFIX = '.tfrecord'


def _image_parts(element: Any) -> tuple[str, Any, int | None]:
  """(key, array, label) from (key, array), (key, array, label) or a dict.

  A dict may hold 'key', 'image' (or 'array') and 'label'; a tuple's third
  item may be an int label or a metadata dict with 'label'.
  """
  if isinstance(element, dict):
    image = element['image'] if 'image' in element else element['array']
    return element['key'], image, element.get('label')
  key, image, *rest = element
  label = rest[0] if rest else None
  if isinstance(label, dict):
    label = label.get('label')
  return key, image, label


class _EncodeImageFn(beam.DoFn):

  def __init__(self):
    self._written = Metrics.counter(NAMESPACE, 'image_examples')

  def process(self, element):
    key, image, label = _image_parts(element)
    self._written.inc()
    yield examples_lib.encode_image_example(key, image, label)


def _sink_args(num_shards: int, compression_type: str) -> dict:
  return dict(file_name_suffix=SUFFIX, num_shards=num_shards,
              compression_type=compression_type)


class WriteImageExamples(beam.PTransform):
  """Decoded images -> sharded TFRecord of image tf.train.Example.

  Input elements: (key, uint8 HWC array), (key, array, label | metadata dict)
  or {'key', 'image', 'label'} dicts. num_shards=0 lets the runner choose.
  """

  def __init__(self, file_path_prefix: str, num_shards: int = 0,
               compression_type: str = 'auto'):
    super().__init__()
    self._prefix = file_path_prefix
    self._sink = _sink_args(num_shards, compression_type)

  def expand(self, images):
    return (images
            | 'EncodeImageExample' >> beam.ParDo(_EncodeImageFn()).with_output_types(bytes)
            | 'WriteTFRecord' >> beam.io.WriteToTFRecord(self._prefix, **self._sink))


class WriteSequenceExamples(beam.PTransform):
  """`SequenceRecord`s -> sharded TFRecord of tf.train.SequenceExample."""

  def __init__(self, file_path_prefix: str, spec: SequenceSpec = SequenceSpec(),
               num_shards: int = 0, compression_type: str = 'auto'):
    super().__init__()
    self._prefix, self._spec = file_path_prefix, spec
    self._sink = _sink_args(num_shards, compression_type)

  def expand(self, records):
    spec = self._spec
    return (records
            | 'EncodeSequenceExample' >> beam.Map(
                lambda r: seq_lib.encode_sequence_example(r, spec))
            .with_input_types(SequenceRecord).with_output_types(bytes)
            | 'WriteTFRecord' >> beam.io.WriteToTFRecord(self._prefix, **self._sink))
