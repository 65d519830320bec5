"""TFRecord files: read every record that survives damage; write prepared examples.

  p | ReadTFRecords('in/*.tfrecord')  -> `.records` (filename, bytes), `.failed`
  decoded.decoded | WriteImageExamples('out/train', labels=...)  -> out/train-00000-of-00004.tfrecord
  seqs | WriteSequenceExamples('out/seq')

`ReadTFRecords` is the TFRecord reader of every beam_dl pipeline
(`ReadImageExamples`, `ReadSequenceExamples`, `pipelines.preprocess`): it
frames each file with `beam_dl.io.tfrecord.read_records`, so a corrupt or
truncated record is one dead letter naming the file and byte offset, and
the good records before (and, where the framing survives, after) it still
come through, where Beam's `ReadFromTFRecord` fails the job.

Formats are the shared on-disk ones of `beam_dl.formats`: image
tf.train.Example (`image/raw`, `image/shape`, `label`, `key`) and sequence
tf.train.SequenceExample (context `key`/`label`/`target`, feature lists
`values`/`ids`). Both transforms return the written file names (what
`WriteToTFRecord` returns).
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Union

import apache_beam as beam
from apache_beam.io.filesystems import CompressionTypes
from apache_beam.metrics import Metrics

from beam_dl.core.deadletter import FAILED, dead_letter, describe
from beam_dl.core.element_types import DeadLetter, DecodedImage, KeyedBytes, Record
from beam_dl.decoding.sequences import SequenceRecord
from beam_dl.formats import image_example, sequence_example
from beam_dl.formats.sequence_example import SequenceSpec
from beam_dl.io import files as files_lib
from beam_dl.io import tfrecord as tfrecord_lib
from transforms.files import MatchReadableFiles, unreadable_dead_letter

NAMESPACE = 'beam_dl.tfrecords'
SUFFIX = '.tfrecord'


class _ReadRecordsFn(beam.DoFn):
  """fileio.ReadableFile -> (filename, record) per good record; damage -> FAILED."""

  def __init__(self, compression_type: str):
    self._compression = compression_type
    self._records = Metrics.counter(NAMESPACE, 'records_read')
    self._damaged = Metrics.counter(NAMESPACE, 'damaged_frames')

  def process(self, readable) -> Iterable:
    path = readable.metadata.path
    compression = (
      CompressionTypes.detect_compression_type(path)
      if self._compression == CompressionTypes.AUTO
      else self._compression
    )
    where = 'byte' if compression == CompressionTypes.UNCOMPRESSED else f'{compression}-decompressed byte'
    read = 0
    try:
      with files_lib.open_regular(readable) as stream:
        for item in tfrecord_lib.read_records(stream):
          if isinstance(item, tfrecord_lib.Damage):
            self._damaged.inc()
            yield beam.pvalue.TaggedOutput(
              FAILED,
              dead_letter(
                f'{path}@{item.offset}',
                'read',
                f'TFRecord {path} at {where} {item.offset}: {item.reason}',
                file=path,
                offset=item.offset,
              ),
            )
          else:
            read += 1
            yield path, item
    except files_lib.FileReadError as e:
      yield beam.pvalue.TaggedOutput(FAILED, unreadable_dead_letter(path, str(e)))
    except files_lib.READ_ERRORS as e:  # the stream itself broke (EIO, bad gzip)
      self._damaged.inc()
      yield beam.pvalue.TaggedOutput(
        FAILED,
        dead_letter(path, 'read', f'TFRecord {path}: read failed after {read} records: {describe(e)}', file=path),
      )
    finally:
      self._records.inc(read)


class TFRecords(NamedTuple):
  """ReadTFRecords' outputs: (filename, record bytes) and dead letters."""

  records: beam.PCollection
  failed: beam.PCollection


class ReadTFRecords(beam.PTransform):
  """TFRecord files matching `file_pattern` -> `.records` (filename, bytes), `.failed`.

  One file per element after the match (splittable per file, not within
  one). `.failed` holds one dead letter (stage 'read', key
  '<file>@<offset>', with `file` and `offset`; in a compressed file the
  offset is into the decompressed stream) per damaged frame, and one per
  match that can't be read at all (a directory, a dangling symlink, a FIFO,
  an I/O error; key = the path). `compression_type` as Beam's ('auto' picks
  gzip/bzip2 by extension).
  """

  def __init__(self, file_pattern: str, compression_type: str = CompressionTypes.AUTO):
    super().__init__()
    self._pattern = file_pattern
    self._compression = compression_type

  def expand(self, pbegin) -> TFRecords:
    matched = pbegin | 'Match' >> MatchReadableFiles(self._pattern, self._compression)
    read = matched.files | 'ReadFrames' >> beam.ParDo(_ReadRecordsFn(self._compression)).with_output_types(
      KeyedBytes, **{FAILED: DeadLetter}
    ).with_outputs(FAILED, main='records')
    failed = (matched.failed, read.failed) | 'MergeFailures' >> beam.Flatten()
    return TFRecords(read.records, failed)


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
    yield image_example.encode_image_example(key, image, label)


def _sink_args(num_shards: int, compression_type: str) -> dict:
  return dict(file_name_suffix=SUFFIX, num_shards=num_shards, compression_type=compression_type)


@beam.typehints.with_input_types(Union[DecodedImage, Record])
@beam.typehints.with_output_types(str)
class WriteImageExamples(beam.PTransform):
  """Decoded images -> sharded TFRecord of image tf.train.Example.

  Input elements: (key, uint8 HWC array), (key, array, label | metadata dict)
  or {'key', 'image', 'label'} dicts. num_shards=0 lets the runner choose.
  """

  def __init__(self, file_path_prefix: str, num_shards: int = 0, compression_type: str = 'auto'):
    super().__init__()
    self._prefix = file_path_prefix
    self._sink = _sink_args(num_shards, compression_type)

  def expand(self, images):
    return (
      images
      | 'EncodeImageExample' >> beam.ParDo(_EncodeImageFn()).with_output_types(bytes)
      | 'WriteTFRecord' >> beam.io.WriteToTFRecord(self._prefix, **self._sink)
    )


@beam.typehints.with_input_types(SequenceRecord)
@beam.typehints.with_output_types(str)
class WriteSequenceExamples(beam.PTransform):
  """`SequenceRecord`s -> sharded TFRecord of tf.train.SequenceExample."""

  def __init__(
    self,
    file_path_prefix: str,
    spec: SequenceSpec = SequenceSpec(),
    num_shards: int = 0,
    compression_type: str = 'auto',
  ):
    super().__init__()
    self._prefix, self._spec = file_path_prefix, spec
    self._sink = _sink_args(num_shards, compression_type)

  def expand(self, records):
    spec = self._spec
    return (
      records
      | 'EncodeSequenceExample'
      >> beam.Map(lambda r: sequence_example.encode_sequence_example(r, spec))
      .with_input_types(SequenceRecord)
      .with_output_types(bytes)
      | 'WriteTFRecord' >> beam.io.WriteToTFRecord(self._prefix, **self._sink)
    )
