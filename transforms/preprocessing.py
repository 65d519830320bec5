"""tf.Transform preprocessing as Beam PTransforms: analyse once, apply everywhere.

Training side (pipelines.preprocess):
  CanonicalImageFiles(shape)        (path, encoded bytes) -> canonical raw example bytes
  CanonicalImageRecords(shape)      (filename, tf.Example bytes) -> canonical raw example bytes
  CanonicalSequences(F, with_ids)   SequenceRecord -> canonical raw example bytes
  AnalyzeAndTransform(config, tmp)  raw example bytes -> TFXIO Arrow batches -> tft_beam:
                                    transformed instances, metadata, transform_fn
  WriteTransformedExamples(prefix)  transformed instances -> sharded TFRecords (no stats)

Serving side (inference pipelines, before RunInference):
  ApplySavedTransform(transform_dir)          (key, raw example bytes) -> (key, {feature: array})
  TransformImagesForInference(transform_dir)  (key, encoded image) -> (key, float32 [H, W, C])
  TransformSequencesForInference(transform_dir, features)
                                              SequenceRecord -> (key, float32 [T, F])

Every Canonical*/Apply* transform returns `.<main>` and `.failed` (dead letters).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from beam_dl.core.deadletter import FAILED, dead_letter, describe
from beam_dl.core.element_types import DeadLetter, EncodedImage, KeyedArray, KeyedBytes, KeyedFeatures, Record
from beam_dl.core.isolate import Failed, failures, isolate
from beam_dl.decoding.sequences import SequenceRecord
from beam_dl.preprocessing import canonical, schemas, stats
from beam_dl.preprocessing import config as config_lib
from beam_dl.preprocessing.config import PreprocessConfig

NAMESPACE = 'beam_dl.preprocessing'


class _CanonicalFn(beam.DoFn):
  """element -> canonical raw example bytes via `to_raw`; CanonicalError -> FAILED."""

  def __init__(self, to_raw: Callable[[Any], bytes], key_of: Callable[[Any], str]):
    self._to_raw = to_raw
    self._key_of = key_of
    self._ok = Metrics.counter(NAMESPACE, 'raw_examples')
    self._bad = Metrics.counter(NAMESPACE, 'raw_failed')

  def process(self, element) -> Iterable:
    try:
      raw = self._to_raw(element)
    except canonical.CanonicalError as e:
      self._bad.inc()
      key = e.key if e.key is not None else self._key_of(element)
      yield beam.pvalue.TaggedOutput(FAILED, dead_letter(key, e.stage, str(e)))
      return
    self._ok.inc()
    yield raw


def _image_file_to_raw(spec):
  return lambda element: canonical.image_file_to_raw(element[0], element[1], spec)


def _image_record_to_raw(spec):
  return lambda element: canonical.image_record_to_raw(element[1], spec, canonical.record_key(*element))


@beam.typehints.with_input_types(EncodedImage)
class CanonicalImageFiles(beam.PTransform):
  """(path, encoded image) -> canonical raw image examples (`.raw`, `.failed`).

  Images are decoded with Pillow to `shape` (H, W, C); the label is read from
  a `_label<N>.` part of the file name (as `pipelines.demo` writes), else -1.
  """

  def __init__(self, shape):
    super().__init__()
    self._spec = canonical.image_spec_for(shape)

  def expand(self, files):
    return files | 'ToRawExample' >> beam.ParDo(
      _CanonicalFn(_image_file_to_raw(self._spec), lambda e: e[0])
    ).with_output_types(bytes, **{FAILED: DeadLetter}).with_outputs(FAILED, main='raw')


@beam.typehints.with_input_types(KeyedBytes)
class CanonicalImageRecords(beam.PTransform):
  """(filename, serialized tf.Example) -> canonical raw image examples.

  Accepts decoded (`image/raw`, `image/shape`, `label`, `key`) and encoded
  (`image/encoded`, `image/class/label`, `image/key`) examples.
  """

  def __init__(self, shape):
    super().__init__()
    self._spec = canonical.image_spec_for(shape)

  def expand(self, records):
    return records | 'ToRawExample' >> beam.ParDo(
      _CanonicalFn(_image_record_to_raw(self._spec), lambda e: canonical.record_key(*e))
    ).with_output_types(bytes, **{FAILED: DeadLetter}).with_outputs(FAILED, main='raw')


@beam.typehints.with_input_types(SequenceRecord)
class CanonicalSequences(beam.PTransform):
  """`SequenceRecord` -> canonical raw sequence examples (`.raw`, `.failed`)."""

  def __init__(self, num_values: int, with_ids: bool):
    super().__init__()
    self._num_values, self._with_ids = num_values, with_ids

  def expand(self, sequences):
    num_values, with_ids = self._num_values, self._with_ids
    return sequences | 'ToRawExample' >> beam.ParDo(
      _CanonicalFn(lambda r: canonical.sequence_to_raw(r, num_values, with_ids), lambda r: r.key)
    ).with_input_types(SequenceRecord).with_output_types(bytes, **{FAILED: DeadLetter}).with_outputs(FAILED, main='raw')


class Transformed(NamedTuple):
  """AnalyzeAndTransform's outputs: instance dicts, their metadata, the transform_fn."""

  instances: beam.PCollection
  metadata: Any
  transform_fn: Any


@beam.typehints.with_input_types(bytes)
class AnalyzeAndTransform(beam.PTransform):
  """Canonical raw example bytes -> tf.Transform analysed and transformed data.

  tfx-bsl's TFXIO (`TFExampleBeamRecord` with the config's schema) parses the
  serialized examples into Arrow RecordBatches in C++; `tft_beam` runs the
  full-pass analysers over them and applies the resulting graph. Outputs are
  instance dicts of numpy arrays, including the `stats/` features.
  """

  def __init__(self, config: PreprocessConfig, temp_dir: str):
    super().__init__()
    self._config = config
    self._temp_dir = temp_dir

  def expand(self, raw_examples):
    import tensorflow_transform.beam as tft_beam
    from tfx_bsl.public import tfxio

    from beam_dl.preprocessing import schemas

    source = tfxio.TFExampleBeamRecord(
      physical_format='tfrecord',
      schema=schemas.schema_from_feature_spec(self._config.feature_spec()),
      telemetry_descriptors=['beam_dl', 'preprocess'],
    )
    record_batches = raw_examples | 'ToRecordBatches' >> source.BeamSource()
    with tft_beam.Context(temp_dir=self._temp_dir):
      (instances, metadata), transform_fn = (
        record_batches,
        source.TensorAdapterConfig(),
      ) | 'AnalyzeAndTransform' >> tft_beam.AnalyzeAndTransformDataset(self._config.preprocessing_fn())
    return Transformed(instances, metadata, transform_fn)


def training_schema(metadata):
  """The transformed schema without the `stats/` features (what records hold)."""
  from tensorflow_transform.tf_metadata import schema_utils

  feature_spec = schema_utils.schema_as_feature_spec(metadata.schema).feature_spec
  return schema_utils.schema_from_feature_spec(stats.drop(feature_spec))


# Input undeclared: tft types AnalyzeAndTransformDataset's instances as a Union with its metadata.
@beam.typehints.with_output_types(str)
class WriteTransformedExamples(beam.PTransform):
  """Transformed instance dicts -> `<prefix>-SSSSS-of-NNNNN.tfrecord` of tf.Example.

  `metadata` is AnalyzeAndTransform's transformed metadata; the `stats/`
  features are dropped, so records hold exactly the model features.
  """

  def __init__(self, file_path_prefix: str, metadata, num_shards: int = 0):
    super().__init__()
    self._prefix = file_path_prefix
    self._metadata = metadata
    self._num_shards = num_shards

  def expand(self, instances):
    import tensorflow_transform as tft

    coder = tft.coders.ExampleProtoCoder(training_schema(self._metadata))
    written = Metrics.counter(NAMESPACE, 'transformed_examples')

    def encode(instance):
      written.inc()
      return coder.encode(stats.drop(instance))

    return (
      instances
      | 'Encode' >> beam.Map(encode)
      | 'WriteTFRecords'
      >> beam.io.WriteToTFRecord(self._prefix, file_name_suffix='.tfrecord', num_shards=self._num_shards)
    )


@beam.typehints.with_output_types(Record)
class ExtractStats(beam.PTransform):
  """Transformed instances -> one dict {stat name: [floats]} (from any one row)."""

  def expand(self, instances):
    return (
      instances
      | 'OneRow' >> beam.combiners.Sample.FixedSizeGlobally(1)
      | 'ToStats' >> beam.Map(lambda rows: stats.from_row(rows[0]) if rows else {}).with_output_types(Record)
    )


# ---------------------------------------------------------------- serving


class LoadedTransform:
  """A transform directory ready to apply: raw feature spec + transform layer."""

  def __init__(self, transform_dir: str):
    import tensorflow as tf
    import tensorflow_transform as tft

    self.tf = tf
    self.output = tft.TFTransformOutput(transform_dir)
    self.raw_feature_spec = self.output.raw_feature_spec()
    self.layer = self.output.transform_features_layer()

  def parse(self, serialized: list[bytes]):
    return self.tf.io.parse_example(self.tf.constant(serialized), self.raw_feature_spec)

  def apply(self, serialized: list[bytes]) -> list[dict[str, np.ndarray]]:
    """Serialized canonical raw examples -> one {feature: array} per example."""
    outputs = stats.drop(self.layer(self.parse(serialized)))
    columns = {name: _rows(self.tf, value, len(serialized)) for name, value in outputs.items()}
    return [{name: rows[i] for name, rows in columns.items()} for i in range(len(serialized))]


def _rows(tf, value, n: int) -> list[np.ndarray]:
  """A batched (dense or sparse) tensor -> n per-example numpy arrays."""
  if isinstance(value, tf.SparseTensor):
    ragged = tf.RaggedTensor.from_sparse(value)
    flat = ragged.flat_values.numpy()
    splits = ragged.row_splits.numpy()
    rows = [flat[splits[i] : splits[i + 1]] for i in range(len(splits) - 1)]
    return rows + [flat[:0]] * (n - len(rows))
  return list(value.numpy())


class _ApplyTransformFn(beam.DoFn):
  """Batches of (key, raw example bytes) -> (key, features); failures per element."""

  def __init__(self, transform_dir: str, shared_handle: shared.Shared):
    self._transform_dir = transform_dir
    self._shared = shared_handle
    self._ok = Metrics.counter(NAMESPACE, 'serving_transformed')
    self._bad = Metrics.counter(NAMESPACE, 'serving_failed')

  def setup(self):
    directory = self._transform_dir
    self._model = self._shared.acquire(lambda: LoadedTransform(directory), tag=directory)

  def process(self, batch) -> Iterable:
    """TF rejects a whole batch for one bad example: `isolate` halves it until
    each rejected example stands alone and becomes its own dead letter."""
    outcomes = isolate(lambda part: self._model.apply([record for _, record in part]), batch)
    bad = failures(outcomes)
    if bad:
      self._bad.inc(bad)
    if bad < len(batch):
      self._ok.inc(len(batch) - bad)
    for (key, _), outcome in zip(batch, outcomes):
      if isinstance(outcome, Failed):
        yield beam.pvalue.TaggedOutput(FAILED, dead_letter(key, 'transform', describe(outcome.error)))
      else:
        yield key, outcome


@beam.typehints.with_input_types(KeyedBytes)
class ApplySavedTransform(beam.PTransform):
  """(key, canonical raw example bytes) -> (key, {feature: np.ndarray}) with the
  saved tf.Transform graph of `transform_dir` (`.transformed`, `.failed`).

  The graph is loaded once per worker process (`shared.Shared`) and applied to
  batches of up to `batch_size`; an example the graph rejects becomes a dead
  letter (stage 'transform'), never a crash. The `stats/` features are dropped.
  """

  def __init__(self, transform_dir: str, batch_size: int = 256):
    super().__init__()
    self._transform_dir = transform_dir
    self._batch_size = batch_size
    self._shared = shared.Shared()

  def expand(self, keyed_raw):
    return (
      keyed_raw
      | 'Batch' >> beam.BatchElements(min_batch_size=1, max_batch_size=self._batch_size)
      | 'Transform'
      >> beam.ParDo(_ApplyTransformFn(self._transform_dir, self._shared))
      .with_output_types(KeyedFeatures, **{FAILED: DeadLetter})
      .with_outputs(FAILED, main='transformed')
    )


@beam.typehints.with_input_types(EncodedImage)
class TransformImagesForInference(beam.PTransform):
  """(key, encoded image bytes) -> (key, float32 [H, W, C]) ready for RunInference.

  Decodes exactly as `pipelines.preprocess` did (size from the transform
  directory's preprocess.json), applies the saved transform graph, and
  reshapes the `image` feature. Returns `.inputs` and `.failed`.
  """

  def __init__(self, transform_dir: str, batch_size: int = 256):
    super().__init__()
    self._config = config_lib.load(transform_dir)
    if self._config.kind != 'images':
      raise ValueError(f'{transform_dir} holds {self._config.kind!r} preprocessing, not images')
    self._transform_dir = transform_dir
    self._batch_size = batch_size

  def expand(self, keyed_bytes):
    shape = self._config.image_shape
    raw = keyed_bytes | 'Canonical' >> CanonicalImageFiles(shape)
    return _apply_for_inference(
      raw,
      self._transform_dir,
      self._batch_size,
      lambda features: np.asarray(features['image'], np.float32).reshape(shape),
    )


@beam.typehints.with_input_types(SequenceRecord)
class TransformSequencesForInference(beam.PTransform):
  """`SequenceRecord` -> (key, float32 [T, F]) ready for RunInference on a
  sequence model trained with `DataConfig(kind='transformed', features=...)`.

  Builds the canonical raw example exactly as `pipelines.preprocess` did (value
  columns; raw ids from `meta['raw_ids']`, else the integer ids as strings),
  applies the saved graph -- its scalers and its vocabulary, so every id gets
  the integer it had in the training records and an unseen one the OOV id --
  and stacks `features` per step in the trainer's order, keeping the most
  recent `max_len` steps (0: all), as the training input pipeline does.
  Returns `.inputs` and `.failed`.
  """

  def __init__(self, transform_dir: str, features, max_len: int = 0, batch_size: int = 256):
    super().__init__()
    self._config = config_lib.load(transform_dir)
    if self._config.kind != 'sequences':
      raise ValueError(f'{transform_dir} holds {self._config.kind!r} preprocessing, not sequences')
    if not features:
      raise ValueError('features must name the per-step transformed features of the model input')
    self._transform_dir = transform_dir
    self._features, self._max_len = tuple(features), int(max_len)
    self._batch_size = batch_size

  def expand(self, records):
    raw = records | 'Canonical' >> CanonicalSequences(self._config.num_values, self._config.with_ids)
    features, max_len = self._features, self._max_len
    return _apply_for_inference(raw, self._transform_dir, self._batch_size, lambda f: step_inputs(f, features, max_len))


def step_inputs(features: dict, names, max_len: int = 0) -> np.ndarray:
  """One transformed example's per-step `names` stacked as float32 [T, F],
  the most recent `max_len` steps (0: all)."""
  steps = np.stack([np.asarray(features[name], np.float32) for name in names], axis=-1)
  return steps[-max_len:] if max_len else steps


def _apply_for_inference(raw, transform_dir: str, batch_size: int, to_input: Callable) -> 'InferenceInputs':
  """Canonical raw examples (`.raw`, `.failed`) -> the saved graph -> model inputs."""
  keyed = raw.raw | 'KeyByExampleKey' >> beam.Map(_keyed_raw)
  applied = keyed | 'ApplySavedTransform' >> ApplySavedTransform(transform_dir, batch_size)
  inputs = applied.transformed | 'ToModelInput' >> beam.MapTuple(
    lambda key, features: (key, to_input(features))
  ).with_output_types(KeyedArray)
  failed = (raw.failed, applied.failed) | 'MergeFailures' >> beam.Flatten()
  return InferenceInputs(inputs, failed)


class InferenceInputs(NamedTuple):
  inputs: beam.PCollection
  failed: beam.PCollection


def _keyed_raw(raw: bytes) -> tuple[str, bytes]:
  """(key feature, raw example) for a canonical raw example: image and
  sequence records share the `key` feature (beam_dl.preprocessing.schemas)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  key = tf.train.Example.FromString(raw).features.feature[schemas.KEY].bytes_list.value[0]
  return key.decode('utf-8'), raw
