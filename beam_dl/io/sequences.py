"""Parse serialized tf.train.SequenceExample / tf.train.Example into sequences.

A sequence is a `SequenceRecord`: a key, a [T, F] float32 array of per-step
values, optional [T] int64 categorical ids, and an optional class `label` or
regression `target`. This is the in-memory side of the on-disk sequence format
(context `key`/`label`/`target`, feature lists `values` and `ids`).

Parsing goes through TensorFlow's vectorised parsers (`tf.io.parse_sequence_example`,
`tf.io.parse_example`) on a whole batch at once: about 3 us a record against
~250 us for one `parse_single_sequence_example` call. A batch that TensorFlow
rejects (bad bytes, wrong types) is split in halves until the bad records are
isolated, so one bad record costs O(log n) extra parses and never the batch.
Every feature is parsed as a `RaggedFeature` so that the checks TF cannot make
(a missing key, steps of the wrong width, ids out of step with values) give a
per-record reason instead of an opaque batch error.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from beam_dl.isolate import Failed, isolate


def _tf():
  """TensorFlow, imported on first use (keeps `import beam_dl` light).

  No module global is cached: after the first import this is a dict lookup
  in sys.modules, and module state stays the same on every worker.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


class SequenceParseError(ValueError):
  """A record that cannot become a `SequenceRecord`; the message is the reason."""


@dataclasses.dataclass(eq=False)
class SequenceRecord:
  """One variable-length sequence and its context.

  Attributes:
    key: the sequence's id (user, session, sensor...).
    values: float32 [T, F] per-step features.
    ids: optional int64 [T] categorical ids (item ids), aligned with values.
    label: optional int class index.
    target: optional float regression target (float32 vector for several).
    meta: free-form metadata carried along (source path, chunk index...).
  """

  key: str
  values: np.ndarray
  ids: np.ndarray | None = None
  label: int | None = None
  target: float | np.ndarray | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def length(self) -> int:
    return int(self.values.shape[0])

  def replace(self, **changes) -> 'SequenceRecord':
    return dataclasses.replace(self, **changes)

  def __eq__(self, other):
    if not isinstance(other, SequenceRecord):
      return NotImplemented
    return (self.key == other.key and self.label == other.label
            and np.array_equal(np.asarray(self.target, object if self.target is None else float),
                               np.asarray(other.target, object if other.target is None else float))
            and _same_meta(self.meta, other.meta)
            and np.array_equal(self.values, other.values)
            and ((self.ids is None and other.ids is None) or
                 (self.ids is not None and other.ids is not None and
                  np.array_equal(self.ids, other.ids))))

  def __repr__(self):
    return (f'SequenceRecord(key={self.key!r}, values={self.values.tolist()!r}, '
            f'ids={None if self.ids is None else self.ids.tolist()!r}, '
            f'label={self.label!r}, target={self.target!r}, meta={dict(self.meta)!r})')


def _same_meta(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
  if set(a) != set(b):
    return False
  for k in a:
    x, y = a[k], b[k]
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
      if not np.array_equal(np.asarray(x), np.asarray(y)):
        return False
    elif x != y:
      return False
  return True


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
  key_feature: str = 'key'
  values_feature: str = 'values'
  ids_feature: str | None = 'ids'
  label_feature: str | None = 'label'
  target_feature: str | None = 'target'
  require_label: bool = False

  def __post_init__(self):
    if self.num_features is not None and self.num_features < 1:
      raise ValueError(f'num_features must be >= 1, got {self.num_features}')

  def context_features(self) -> dict:
    tf = _tf()
    feats = {self.key_feature: tf.io.RaggedFeature(tf.string)}
    if self.label_feature:
      feats[self.label_feature] = tf.io.RaggedFeature(tf.int64)
    if self.target_feature:
      feats[self.target_feature] = tf.io.RaggedFeature(tf.float32)
    return feats

  def list_features(self) -> dict:
    tf = _tf()
    feats = {self.values_feature: tf.io.RaggedFeature(tf.float32)}
    if self.ids_feature:
      feats[self.ids_feature] = tf.io.RaggedFeature(tf.int64)
    return feats


_TF_NOISE = re.compile(r'^\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]$')


def tf_error_message(err: Exception) -> str:
  """TensorFlow's own message without the op-name decoration."""
  msg = getattr(err, 'message', None) or str(err)
  return _TF_NOISE.sub('', msg).replace('Name: <unknown>, ', '').strip()


def _isolating(parse_batch: Callable[[list[bytes]], list],
               records: list[bytes], what: str) -> list:
  """`parse_batch(records)`, splitting the batch until TF's errors are isolated
  (`beam_dl.isolate`); a record TF rejects alone gets its own parse error."""
  op_error = _tf().errors.OpError  # InvalidArgument (types, bad bytes), DataLoss, ...
  outcomes = isolate(parse_batch, records, splits=lambda e: isinstance(e, op_error))
  return [SequenceParseError(f'cannot parse {what}: {tf_error_message(o.error)}')
          if isinstance(o, Failed) else o for o in outcomes]


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
  return [flat[splits[i]:splits[i + 1]] for i in range(len(splits) - 1)]


def _split3(ragged) -> list[tuple[np.ndarray, np.ndarray]]:
  """Rows of a 3-level RaggedTensor: (flat values, per-step lengths) per record."""
  outer, inner = (s.numpy() for s in ragged.nested_row_splits)
  flat = ragged.flat_values.numpy()
  rows = []
  for i in range(len(outer) - 1):
    steps = inner[outer[i]:outer[i + 1] + 1]
    rows.append((flat[steps[0]:steps[-1]], np.diff(steps)))
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
      raise SequenceParseError(
          f'missing feature {spec.label_feature or spec.target_feature!r}')
    return key, label, target

  return get


def _check_ids(spec: SequenceSpec, ids: np.ndarray, steps: int) -> np.ndarray | None:
  if len(ids) == 0:
    return None
  if len(ids) != steps:
    raise SequenceParseError(
        f'{spec.ids_feature!r} has {len(ids)} ids but {spec.values_feature!r} has '
        f'{steps} steps')
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
        f'expected {want} (ragged where a fixed width was declared)')
  return flat.astype(np.float32, copy=False).reshape(steps, want)


def parse_sequence_examples(
    serialized: Sequence[bytes], spec: SequenceSpec
) -> list[SequenceRecord | SequenceParseError]:
  """Serialized tf.train.SequenceExample -> one result per record, in order.

  A result is a `SequenceRecord`, or a `SequenceParseError` whose message says
  why that record is malformed (bad bytes, wrong type, missing or ragged
  feature). Never raises for bad data.
  """
  tf = _tf()
  ctx_feats, seq_feats = spec.context_features(), spec.list_features()

  def parse_batch(records: list[bytes]) -> list:
    ctx, seq, _ = tf.io.parse_sequence_example(records, ctx_feats, seq_feats)
    context = _context(spec, ctx)
    values = _split3(seq[spec.values_feature])
    ids = ([f for f, _ in _split3(seq[spec.ids_feature])]
           if spec.ids_feature else None)
    out = []
    for i in range(len(records)):
      try:
        key, label, target = context(i)
        vals = _values(spec, *values[i])
        out.append(SequenceRecord(
            key, vals, _check_ids(spec, ids[i], vals.shape[0]) if ids else None,
            label, target))
      except SequenceParseError as err:
        out.append(err)
    return out

  return _isolating(parse_batch, list(serialized), 'SequenceExample') if serialized else []


def parse_list_examples(
    serialized: Sequence[bytes], spec: SequenceSpec
) -> list[SequenceRecord | SequenceParseError]:
  """Serialized tf.train.Example with list features -> one result per record.

  `values` is a flat float list of T*F floats (row-major) and `ids` an int64
  list of T ids; `spec.num_features` (F) is required to know T. A length that
  is not a multiple of F is a malformed record.
  """
  if not spec.num_features:
    raise ValueError('parse_list_examples needs spec.num_features (F) to split steps')
  tf = _tf()
  feats = {**spec.context_features(), **spec.list_features()}

  def parse_batch(records: list[bytes]) -> list:
    parsed = tf.io.parse_example(records, feats)
    context = _context(spec, parsed)
    values = _split(parsed[spec.values_feature])
    ids = _split(parsed[spec.ids_feature]) if spec.ids_feature else None
    out = []
    for i in range(len(records)):
      try:
        key, label, target = context(i)
        flat = values[i]
        if len(flat) == 0:
          raise SequenceParseError(f'feature {spec.values_feature!r} is missing or empty')
        if len(flat) % spec.num_features:
          raise SequenceParseError(
              f'{spec.values_feature!r} has {len(flat)} floats, not a multiple of '
              f'num_features={spec.num_features} (ragged where a fixed width was declared)')
        vals = flat.astype(np.float32, copy=False).reshape(-1, spec.num_features)
        out.append(SequenceRecord(
            key, vals, _check_ids(spec, ids[i], vals.shape[0]) if ids else None,
            label, target))
      except SequenceParseError as err:
        out.append(err)
    return out

  return _isolating(parse_batch, list(serialized), 'Example') if serialized else []


def encode_sequence_example(record: SequenceRecord, spec: SequenceSpec = SequenceSpec()) -> bytes:
  """A `SequenceRecord` as serialized tf.train.SequenceExample (the on-disk format)."""
  tf = _tf()
  context = {spec.key_feature: tf.train.Feature(
      bytes_list=tf.train.BytesList(value=[record.key.encode('utf-8')]))}
  if record.label is not None and spec.label_feature:
    context[spec.label_feature] = tf.train.Feature(
        int64_list=tf.train.Int64List(value=[int(record.label)]))
  if record.target is not None and spec.target_feature:
    context[spec.target_feature] = tf.train.Feature(
        float_list=tf.train.FloatList(value=np.atleast_1d(record.target).astype(float)))
  values = np.asarray(record.values, np.float32)
  lists = {spec.values_feature: tf.train.FeatureList(feature=[
      tf.train.Feature(float_list=tf.train.FloatList(value=step)) for step in values])}
  if record.ids is not None and spec.ids_feature:
    lists[spec.ids_feature] = tf.train.FeatureList(feature=[
        tf.train.Feature(int64_list=tf.train.Int64List(value=[int(i)])) for i in record.ids])
  return tf.train.SequenceExample(
      context=tf.train.Features(feature=context),
      feature_lists=tf.train.FeatureLists(feature_list=lists)).SerializeToString()


def results_by_kind(results: Iterable) -> tuple[list[SequenceRecord], list[SequenceParseError]]:
  """Split parse results into (records, errors)."""
  ok, bad = [], []
  for r in results:
    (bad if isinstance(r, SequenceParseError) else ok).append(r)
  return ok, bad
