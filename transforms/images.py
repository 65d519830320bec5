"""Public PTransforms that read and decode images.

  ReadImageFiles(pattern)      -> (path, encoded bytes), plus `.failed`
                                  (defer_read=True: (path, fileio.ReadableFile),
                                  read by DecodeImages on its decode thread)
  ReadImageExamples(pattern)   -> (key, encoded bytes or uint8 pixels) from
                                  TFRecords of image tf.train.Example, plus `.failed`
  DecodeImages(spec)           -> `.decoded` (key, uint8 HWC array), `.failed`
  NormalizeImages(mean, std)   -> (key, float32 (x/255 - mean)/std)

Elements may carry metadata after the bytes, (key, bytes, meta); every step
keeps it: (key, array, meta). `with_metadata=True` on the readers produces
such triples with the source path/file and label.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from beam_dl.core.deadletter import FAILED, ErrorHandling, dead_letter
from beam_dl.core.element_types import DeadLetter, DecodedImage, EncodedImage
from beam_dl.core.lookahead import Lookahead
from beam_dl.decoding.images import ImageDecodeError, ImageSpec, decode_image, fit_image, normalize, rng_for_key
from beam_dl.formats import image_example
from beam_dl.io import files as files_lib
from transforms.files import MatchFileChunks, readable_files, unreadable_dead_letter
from transforms.tfrecords import ReadTFRecords

_NAMESPACE = 'beam_dl.images'  # metric names (Prometheus: beam_dl_images_*) stay stable
# Elements decoded ahead of the outputs: two batches of the default 128, so
# the next batch decodes while the model runs the current one.
DECODE_AHEAD = 256
# ...and at most this many encoded bytes pending (large photos).
DECODE_AHEAD_BYTES = 64 << 20
# Inputs handed to the decode thread per task (see Lookahead's `group`).
DECODE_GROUP = 16


class ImageInputs(NamedTuple):
  """A reader's outputs: (key, encoded bytes[, meta]) and dead letters."""

  images: beam.PCollection
  failed: beam.PCollection


class _ReadImageFilesFn(beam.DoFn):
  """A chunk of matched files (`transforms.files.MatchFileChunks`) ->
  (path, bytes[, meta]) per file; unreadable files -> FAILED. With
  defer_read: (path, its fileio.ReadableFile[, meta]), read where decoded."""

  def __init__(self, with_metadata: bool, label_fn: Callable[[str], Any] | None, defer_read: bool = False):
    self._with_metadata = with_metadata
    self._label_fn = label_fn
    self._defer_read = defer_read

  def process(self, chunk) -> Iterable:
    for readable in readable_files(chunk):
      path = readable.metadata.path
      data = readable
      if not self._defer_read:
        try:
          data = files_lib.read_all(readable)
        except files_lib.FileReadError as e:
          yield beam.pvalue.TaggedOutput(FAILED, unreadable_dead_letter(path, str(e)))
          continue
      if not self._with_metadata:
        yield path, data
      else:
        yield path, data, {'path': path, 'label': self._label_fn(path) if self._label_fn else None}


class ReadImageFiles(beam.PTransform):
  """Reads every file matching `file_pattern` as (path, bytes).

  With `with_metadata=True` elements are (path, bytes, {'path', 'label'}),
  the label from `label_fn(path)` (e.g. the parent folder's class index) or
  None.

  Returns `.images` and `.failed`: each match that can't be read (a
  directory or dangling symlink matching the glob, a FIFO, an I/O error such
  as EIO or EACCES) is one dead letter (key = path, stage 'read').

  `defer_read=True`: elements carry the `fileio.ReadableFile` in place of
  its bytes, and `DecodeImages` reads each file on its decode thread: the
  file I/O leaves the bundle's thread (in bench_flagship's profile the read
  was a fifth of that thread's per-image time) and encoded bytes live only
  until decoded. A file that can't be opened or read is then DecodeImages'
  dead letter, with the same key, stage 'read' and reason.
  """

  def __init__(
    self,
    file_pattern: str,
    with_metadata: bool = False,
    label_fn: Callable[[str], Any] | None = None,
    defer_read: bool = False,
  ):
    super().__init__()
    self._file_pattern = file_pattern
    self._with_metadata = with_metadata or label_fn is not None
    self._label_fn = label_fn
    self._defer_read = defer_read

  def expand(self, pbegin) -> ImageInputs:
    matched = pbegin | 'Match' >> MatchFileChunks(self._file_pattern)
    content = fileio.ReadableFile if self._defer_read else bytes
    keyed = tuple[str, content, dict] if self._with_metadata else tuple[str, content]
    read = matched.chunks | 'ReadFiles' >> beam.ParDo(
      _ReadImageFilesFn(self._with_metadata, self._label_fn, self._defer_read)
    ).with_output_types(keyed, **{FAILED: DeadLetter}).with_outputs(FAILED, main='images')
    failed = (matched.failed, read.failed) | 'MergeFailures' >> beam.Flatten()
    return ImageInputs(read.images, failed)


class _ParseImageExampleFn(beam.DoFn):
  """(filename, serialized image tf.train.Example) -> (key, encoded bytes or uint8 pixels[, meta])."""

  def __init__(self, image_feature: str, key_feature: str, label_feature: str | None = None):
    self._features = dict(
      encoded_feature=image_feature, key_feature=key_feature, label_feature=label_feature or image_example.ENCODED_LABEL
    )
    self._with_metadata = label_feature is not None
    self._failed = Metrics.counter(_NAMESPACE, 'examples_failed')

  def process(self, element: tuple[str, bytes]) -> Iterable:
    filename, record = element
    fallback_key = f'{filename}@sha1:{hashlib.sha1(record).hexdigest()[:16]}'
    try:
      parsed = image_example.parse_image_example(record, **self._features)
    except image_example.ImageExampleError as e:
      self._failed.inc()
      yield beam.pvalue.TaggedOutput(FAILED, dead_letter(fallback_key if e.key is None else e.key, 'parse', str(e)))
      return
    key = fallback_key if parsed.key is None else parsed.key
    image = parsed.encoded if parsed.pixels is None else parsed.pixels
    if not self._with_metadata:
      yield key, image
      return
    yield key, image, {'source': filename, 'label': parsed.label}


class ReadImageExamples(beam.PTransform):
  """Reads (key, image) from TFRecord files of image tf.train.Example.

  Both layouts of `beam_dl.formats.image_example`: a record with decoded
  pixels (`image/raw` + `image/shape`, what `WriteImageExamples` and
  `pipelines.preprocess` write) gives (key, uint8 [H, W, C] array), one with
  an encoded file in `image_feature` gives (key, encoded bytes);
  `DecodeImages` takes either. The key is the `key_feature` (else `key`)
  value, or `<file>@sha1:<digest>` of the record when absent. Records that
  are not Examples or hold no image, and damaged TFRecord frames and
  unreadable files (see `ReadTFRecords`), go to `.failed`. With
  `with_metadata=True` elements are (key, image, {'source': file, 'label':
  int from `label_feature` (else `label`) or None}).
  """

  def __init__(
    self,
    file_pattern: str,
    image_feature: str = image_example.ENCODED,
    key_feature: str = image_example.ENCODED_KEY,
    with_metadata: bool = False,
    label_feature: str = image_example.ENCODED_LABEL,
  ):
    super().__init__()
    self._file_pattern = file_pattern
    self._image_feature = image_feature
    self._key_feature = key_feature
    self._label_feature = label_feature if with_metadata else None

  def expand(self, pbegin) -> ImageInputs:
    read = pbegin | 'ReadRecords' >> ReadTFRecords(self._file_pattern)
    parsed = read.records | 'ParseExamples' >> beam.ParDo(
      _ParseImageExampleFn(self._image_feature, self._key_feature, self._label_feature)
    ).with_output_types(EncodedImage, **{FAILED: DeadLetter}).with_outputs(FAILED, main='images')
    failed = (read.failed, parsed.failed) | 'MergeFailures' >> beam.Flatten()
    return ImageInputs(parsed.images, failed)


def read_and_decode(data, spec: ImageSpec, rng: np.random.Generator | None = None) -> np.ndarray:
  """Encoded bytes, or a `fileio.ReadableFile` read first, decoded (raises
  FileReadError or ImageDecodeError); already decoded pixels (image/raw
  records) only fitted to `spec`."""
  if isinstance(data, np.ndarray):
    return fit_image(data, spec, rng)
  return decode_image(files_lib.content(data), spec, rng)


class _DecodeImageFn(beam.DoFn):
  """(key, bytes, ReadableFile or uint8 pixels) -> (key, array); undecodable
  inputs (and unreadable files) -> FAILED with reason.

  With `ahead` > 0 the decodes run on a thread (beam_dl.core.lookahead) up to
  `ahead` elements ahead of the outputs, overlapping with the model's forward
  pass downstream in the same fused stage; outputs keep their order, window
  and timestamp, and the last ones are emitted in finish_bundle.
  """

  def __init__(self, spec: ImageSpec, ahead: int = 0):
    self._spec = spec
    self._ahead = ahead
    self._decoded = Metrics.counter(_NAMESPACE, 'decoded')
    self._failed = Metrics.counter(_NAMESPACE, 'failed')
    self._bytes = Metrics.distribution(_NAMESPACE, 'encoded_bytes')

  def setup(self):
    spec = self._spec
    self._lookahead = Lookahead(
      lambda data_rng: read_and_decode(data_rng[0], spec, data_rng[1]),
      self._ahead,
      max_cost=DECODE_AHEAD_BYTES,
      group=DECODE_GROUP,
    )

  def teardown(self):
    self._lookahead.close()

  def process(self, element: tuple, windowed=beam.DoFn.WindowedValueParam) -> Iterable:
    key, data, *meta = element
    size = data.nbytes if isinstance(data, np.ndarray) else files_lib.content_size(data)
    self._bytes.update(size)
    # Random crops are seeded per (seed, key): reproducible whatever the bundling.
    rng = rng_for_key(key, self._spec.seed) if self._spec.crop == 'random' else None
    for context, outcome in self._lookahead.submit((data, rng), (key, meta, windowed), size):
      yield self._output(context, outcome)

  def finish_bundle(self) -> Iterable:
    for context, outcome in self._lookahead.drain():
      yield self._output(context, outcome)

  def _output(self, context, outcome):
    """The element for one decode outcome, in its input's windows and
    timestamp (emitted later than its input, it must not take the current
    element's). The input's WindowedValue is kept whole rather than asking
    Beam for the window and timestamp: those parameters cost a Timestamp
    object and a window explosion per element, ~15% of the stage's
    per-element time in bench_flagship's profile."""
    key, meta, windowed = context
    if isinstance(outcome, ImageDecodeError):
      self._failed.inc()
      Metrics.counter(_NAMESPACE, f'failed_{outcome.kind}').inc()
      return beam.pvalue.TaggedOutput(FAILED, windowed.with_value(dead_letter(key, 'decode', str(outcome))))
    if isinstance(outcome, files_lib.FileReadError):  # a deferred read (ReadImageFiles(defer_read=True))
      return beam.pvalue.TaggedOutput(FAILED, windowed.with_value(unreadable_dead_letter(key, str(outcome))))
    if isinstance(outcome, Exception):
      raise outcome
    self._decoded.inc()
    return windowed.with_value((key, outcome, *meta))


@beam.typehints.with_input_types(EncodedImage)
class DecodeImages(ErrorHandling, beam.PTransform):
  """Decodes (key, encoded bytes) to (key, uint8 [H, W, C]) per `spec`.

  The bytes may also be a `fileio.ReadableFile` (ReadImageFiles with
  defer_read=True), read on the decode thread; one that can't be read is a
  dead letter with stage 'read'.

  Already decoded uint8 pixels in place of the bytes (what `ReadImageExamples`
  gives for `image/raw` records) get the same mode conversion and resize
  (`beam_dl.decoding.images.fit_image`), without an encode/decode round trip.

  (key, bytes, meta...) elements keep whatever follows the bytes:
  (key, array, meta...).

  Returns a tuple with `.decoded` and `.failed` (dead letters with key and
  reason); every input lands in exactly one of them.

  `ahead` (default 256): decode on a background thread up to this many
  elements (and 64 MB of encoded input) ahead, so decoding overlaps the
  model downstream (0: inline).

  `error_threshold` (default 1: never) fails the job when more than that
  fraction of inputs fail; `with_error_handler(ErrorHandler(...))` also
  sends the dead letters to Beam's error handler (beam_dl.core.deadletter).
  """

  def __init__(self, spec: ImageSpec = ImageSpec(), ahead: int = DECODE_AHEAD, *, error_threshold: float = 1.0):
    super().__init__()
    self._spec = spec
    self._ahead = ahead
    self._set_error_threshold(error_threshold)

  def expand(self, pcoll):
    outputs = pcoll | 'Decode' >> beam.ParDo(_DecodeImageFn(self._spec, self._ahead)).with_output_types(
      DecodedImage, **{FAILED: DeadLetter}
    ).with_outputs(FAILED, main='decoded')
    self._report_failures(pcoll, outputs.failed)
    return outputs


@beam.typehints.with_input_types(DecodedImage)
@beam.typehints.with_output_types(DecodedImage)
class NormalizeImages(beam.PTransform):
  """(key, uint8 array, meta...) -> (key, float32 (x * scale - mean) / std, meta...).

  Optional: for serving with the JAX handler prefer uint8 and the model
  spec's input_scale/input_offset, which apply inside jit.
  """

  def __init__(self, mean: Sequence[float] | float = 0.0, std: Sequence[float] | float = 1.0, scale: float = 1 / 255):
    super().__init__()
    normalize(np.zeros((1, 1, 1), np.uint8), mean, std, scale)  # validate early
    self._args = (mean, std, scale)

  def expand(self, pcoll):
    mean, std, scale = self._args
    return pcoll | 'Normalize' >> beam.Map(
      lambda e: (e[0], normalize(e[1], mean, std, scale), *e[2:])
    ).with_output_types(DecodedImage)


__all__ = ['DecodeImages', 'ImageSpec', 'NormalizeImages', 'ReadImageExamples', 'ReadImageFiles']
