"""The sequence tf.train.SequenceExample: one variable-length sequence per record.

  context        key     bytes, utf-8 (required)
                 label   int64 class index (optional)
                 target  float regression target(s) (optional)
  feature lists  values  F floats per step
                 ids     one int64 categorical id per step (optional)

A list-feature variant, a tf.train.Example with the same context features
and `values` as one flat row-major list of T*F floats (`ids` a list of T),
is read too (`parse_list_examples`). `SequenceSpec` renames the features and
declares the step width F.

Beam side: `encode_sequence_example` (`SequenceRecord` -> bytes),
`parse_sequence_examples` / `parse_list_examples` (a batch of bytes -> one
`SequenceRecord` or `SequenceParseError` per record) and `own_key`.
Training side (tf.data): `tf_feature_spec` and `parse_single`.

Parsing goes through TensorFlow's vectorised parsers (`tf.io.parse_sequence_example`,
`tf.io.parse_example`) on a whole batch at once: about 3 us a record against
~250 us for one `parse_single_sequence_example` call; a batch TensorFlow
rejects is split until the bad records are isolated (`beam_dl.decoding.sequences`).
Every feature is parsed as a `RaggedFeature` so that the checks TF cannot make
(a missing key, steps of the wrong width, ids out of step with values) give a
per-record reason instead of an opaque batch error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from beam_dl.decoding.sequences import SequenceParseError, SequenceRecord, _isolating
from beam_dl.formats.features import bytes_feature, feature_values, float_feature, int64_feature, tensorflow

KEY, LABEL, TARGET, VALUES, IDS = 'key', 'label', 'target', 'values', 'ids'

__all__ = [
  'KEY',
  'LABEL',
  'TARGET',
  'VALUES',
  'IDS',
  'SequenceSpec',
  'SequenceParseError',
  'encode_sequence_example',
  'parse_sequence_examples',
  'parse_list_examples',
  'own_key',
  'tf_feature_spec',
  'parse_single',
]


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
  """Feature names and shapes of serialized sequences.

  Attributes:
    num_features: F, the declared width of each step of `values`; a step of
      another width is a malformed record. None accepts any width that is the
      same for all steps of a record.
    key_feature: context bytes feature holding the key (required).
    values_feature: feature list (SequenceExample) or flat float list
      (Example, T*F floats, row-major) of per-step values.
    ids_feature: int64 feature list / list of per-step ids, or None.
    label_feature: int64 context feature with the class, or None.
    target_feature: float context feature with a regression target, or None.
    require_label: a record without label (or target) is malformed.
  """

  num_features: int | None = None
  key_feature: str = KEY
  values_feature: str = VALUES
  ids_feature: str | None = IDS
  label_feature: str | None = LABEL
  target_feature: str | None = TARGET
  require_label: bool = False

  def __post_init__(self):
    if self.num_features is not None and self.num_features < 1:
      raise ValueError(f'num_features must be >= 1, got {self.num_features}')

  def context_features(self) -> dict:
    tf = tensorflow()
    feats = {self.key_feature: tf.io.RaggedFeature(tf.string)}
    if self.label_feature:
      feats[self.label_feature] = tf.io.RaggedFeature(tf.int64)
    if self.target_feature:
      feats[self.target_feature] = tf.io.RaggedFeature(tf.float32)
    return feats

  def list_features(self) -> dict:
    tf = tensorflow()
    feats = {self.values_feature: tf.io.RaggedFeature(tf.float32)}
    if self.ids_feature:
      feats[self.ids_feature] = tf.io.RaggedFeature(tf.int64)
    return feats


def _scalar(rows: list[np.ndarray], i: int, name: str, required: bool, cast):
  row = rows[i]
  if len(row) == 0:
    if required:
      raise SequenceParseError(f'missing feature {name!r}')
    return None
  if len(row) != 1:
    raise SequenceParseError(f'feature {name!r} must hold one value, got {len(row)}')
  try:
    return cast(row[0])
  except (ValueError, UnicodeDecodeError) as err:
    raise SequenceParseError(f'feature {name!r} has a bad value: {err}') from None


def _split(ragged) -> list[np.ndarray]:
  """Rows of a 2-level RaggedTensor as numpy arrays (no per-row TF calls)."""
  flat = ragged.flat_values.numpy()
  splits = ragged.row_splits.numpy()
  return [flat[splits[i] : splits[i + 1]] for i in range(len(splits) - 1)]


def _split3(ragged) -> list[tuple[np.ndarray, np.ndarray]]:
  """Rows of a 3-level RaggedTensor: (flat values, per-step lengths) per record."""
  outer, inner = (s.numpy() for s in ragged.nested_row_splits)
  flat = ragged.flat_values.numpy()
  rows = []
  for i in range(len(outer) - 1):
    steps = inner[outer[i] : outer[i + 1] + 1]
    rows.append((flat[steps[0] : steps[-1]], np.diff(steps)))
  return rows


def _context(spec: SequenceSpec, ctx: Mapping[str, Any]):
  """Per-record extractors of key, label and target from parsed context."""
  keys = _split(ctx[spec.key_feature])
  labels = _split(ctx[spec.label_feature]) if spec.label_feature else None
  targets = _split(ctx[spec.target_feature]) if spec.target_feature else None

  def get(i: int) -> tuple[str, int | None, float | None]:
    key = _scalar(keys, i, spec.key_feature, True, lambda b: b.decode('utf-8'))
    label = _scalar(labels, i, spec.label_feature, False, int) if labels else None
    target = None
    if targets and len(targets[i]):  # a float, or a float32 vector of several targets
      row = targets[i]
      target = float(row[0]) if len(row) == 1 else row.astype(np.float32)
    if spec.require_label and label is None and target is None:
      raise SequenceParseError(f'missing feature {spec.label_feature or spec.target_feature!r}')
    return key, label, target

  return get


def _check_ids(spec: SequenceSpec, ids: np.ndarray, steps: int) -> np.ndarray | None:
  if len(ids) == 0:
    return None
  if len(ids) != steps:
    raise SequenceParseError(f'{spec.ids_feature!r} has {len(ids)} ids but {spec.values_feature!r} has {steps} steps')
  return ids.astype(np.int64)


def _values(spec: SequenceSpec, flat: np.ndarray, widths: np.ndarray) -> np.ndarray:
  """[T, F] values from the flat floats and each step's width, checking F."""
  steps = len(widths)
  if steps == 0:
    raise SequenceParseError(f'feature list {spec.values_feature!r} is missing or empty')
  want = spec.num_features or int(widths[0])
  bad = np.nonzero(widths != want)[0]
  if len(bad):
    raise SequenceParseError(
      f'{spec.values_feature!r} step {int(bad[0])} has {int(widths[bad[0]])} values, '
      f'expected {want} (ragged where a fixed width was declared)'
    )
  return flat.astype(np.float32, copy=False).reshape(steps, want)


def _flat_values(spec: SequenceSpec, flat: np.ndarray) -> np.ndarray:
  """[T, F] values from a flat row-major list of T*F floats, checking F divides it."""
  if len(flat) == 0:
    raise SequenceParseError(f'feature {spec.values_feature!r} is missing or empty')
  if len(flat) % spec.num_features:
    raise SequenceParseError(
      f'{spec.values_feature!r} has {len(flat)} floats, not a multiple of '
      f'num_features={spec.num_features} (ragged where a fixed width was declared)'
    )
  return flat.astype(np.float32, copy=False).reshape(-1, spec.num_features)


def _results(spec: SequenceSpec, count: int, context, values, ids) -> list[SequenceRecord | SequenceParseError]:
  """One result per parsed record: `context(i)` -> (key, label, target),
  `values(i)` -> [T, F], `ids` the per-record id rows (or None); a
  SequenceParseError of either is that record's result."""
  out = []
  for i in range(count):
    try:
      key, label, target = context(i)
      vals = values(i)
      out.append(SequenceRecord(key, vals, _check_ids(spec, ids[i], vals.shape[0]) if ids else None, label, target))
    except SequenceParseError as err:
      out.append(err)
  return out


def parse_sequence_examples(
  serialized: Sequence[bytes], spec: SequenceSpec
) -> list[SequenceRecord | SequenceParseError]:
  """Serialized tf.train.SequenceExample -> one result per record, in order.

  A result is a `SequenceRecord`, or a `SequenceParseError` whose message says
  why that record is malformed (bad bytes, wrong type, missing or ragged
  feature). Never raises for bad data.
  """
  tf = tensorflow()
  ctx_feats, seq_feats = spec.context_features(), spec.list_features()

  def parse_batch(records: list[bytes]) -> list:
    ctx, seq, _ = tf.io.parse_sequence_example(records, ctx_feats, seq_feats)
    context = _context(spec, ctx)
    values = _split3(seq[spec.values_feature])
    ids = [f for f, _ in _split3(seq[spec.ids_feature])] if spec.ids_feature else None
    return _results(spec, len(records), context, lambda i: _values(spec, *values[i]), ids)

  return _isolating(parse_batch, list(serialized), 'SequenceExample') if serialized else []


def parse_list_examples(serialized: Sequence[bytes], spec: SequenceSpec) -> list[SequenceRecord | SequenceParseError]:
  """Serialized tf.train.Example with list features -> one result per record.

  `values` is a flat float list of T*F floats (row-major) and `ids` an int64
  list of T ids; `spec.num_features` (F) is required to know T. A length that
  is not a multiple of F is a malformed record.
  """
  if not spec.num_features:
    raise ValueError('parse_list_examples needs spec.num_features (F) to split steps')
  tf = tensorflow()
  feats = {**spec.context_features(), **spec.list_features()}

  def parse_batch(records: list[bytes]) -> list:
    parsed = tf.io.parse_example(records, feats)
    context = _context(spec, parsed)
    values = _split(parsed[spec.values_feature])
    ids = _split(parsed[spec.ids_feature]) if spec.ids_feature else None
    return _results(spec, len(records), context, lambda i: _flat_values(spec, values[i]), ids)

  return _isolating(parse_batch, list(serialized), 'Example') if serialized else []


def encode_sequence_example(record: SequenceRecord, spec: SequenceSpec = SequenceSpec()) -> bytes:
  """A `SequenceRecord` as a serialized tf.train.SequenceExample."""
  tf = tensorflow()
  context = {spec.key_feature: bytes_feature([record.key.encode('utf-8')])}
  if record.label is not None and spec.label_feature:
    context[spec.label_feature] = int64_feature([record.label])
  if record.target is not None and spec.target_feature:
    context[spec.target_feature] = float_feature(np.atleast_1d(record.target))
  values = np.asarray(record.values, np.float32)
  lists = {spec.values_feature: tf.train.FeatureList(feature=[float_feature(step) for step in values])}
  if record.ids is not None and spec.ids_feature:
    lists[spec.ids_feature] = tf.train.FeatureList(feature=[int64_feature([i]) for i in record.ids])
  return tf.train.SequenceExample(
    context=tf.train.Features(feature=context), feature_lists=tf.train.FeatureLists(feature_list=lists)
  ).SerializeToString()


def own_key(record: bytes, spec: SequenceSpec = SequenceSpec(), fmt: str = 'sequence_example') -> str | None:
  """The key feature of a record that failed to parse, when it can still be read.

  `fmt` is 'sequence_example' or 'example' (the list-feature variant).
  """
  tf = tensorflow()
  proto = tf.train.SequenceExample if fmt == 'sequence_example' else tf.train.Example
  try:
    message = proto.FromString(record)
  except Exception:  # protobuf's DecodeError: not a record at all, no key to read
    return None
  features = (message.context if fmt == 'sequence_example' else message.features).feature
  keys = feature_values(features, spec.key_feature, 'bytes_list')
  return keys[0].decode('utf-8', 'backslashreplace') if keys else None


def tf_feature_spec(
  num_features: int, *, with_ids: bool, target: str = LABEL, num_targets: int = 1
) -> tuple[dict, dict]:
  """(context, sequence) tf.io feature specs for tf.data, fixed-width steps.

  `target` is 'label' (int64, -1 when absent) or 'target' (`num_targets`
  floats, required); `num_features` 0 parses no `values` (ids only).
  """
  tf = tensorflow()
  context = {KEY: tf.io.FixedLenFeature([], tf.string, default_value='')}
  if target == LABEL:
    context[LABEL] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
  else:
    context[TARGET] = tf.io.FixedLenFeature([num_targets], tf.float32)
  steps = {}
  if num_features:
    steps[VALUES] = tf.io.FixedLenSequenceFeature([num_features], tf.float32)
  if with_ids:
    steps[IDS] = tf.io.FixedLenSequenceFeature([1], tf.int64)
  return context, steps


def parse_single(serialized, num_features: int, *, with_ids: bool, target: str = LABEL, num_targets: int = 1) -> dict:
  """tf.data: one serialized SequenceExample -> tensors by feature name.

  'key', the `target` feature, 'values' float32 [T, F] (when
  `num_features`) and 'ids' int64 [T, 1] (when `with_ids`).
  """
  tf = tensorflow()
  context, steps = tf_feature_spec(num_features, with_ids=with_ids, target=target, num_targets=num_targets)
  parsed_context, parsed_steps = tf.io.parse_single_sequence_example(serialized, context, steps)
  return {**parsed_context, **parsed_steps}
