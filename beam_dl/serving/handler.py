"""`JaxModelHandler`: Beam RunInference for Flax models saved by beam_dl.

Loads `beam_dl.models.checkpoints` model directories (orbax or msgpack; never
pickle), compiles the forward pass once per padded batch shape, and returns
one `PredictionResult` per example with the padding stripped. Beyond Beam's
contract (keyed, pre/post-processing, dead letters, inference_args, env_vars,
resource hints, shared models, side-input model refresh) it serves on one
device or shards over a mesh (`beam_dl.serving.devices`), splits a batch
that runs out of device memory (`beam_dl.serving.oom`), and keeps the last
good model serving when a refresh points at a checkpoint that won't load.

    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    handler = KeyedModelHandler(JaxModelHandler('gs://bucket/model'))
    predictions = keyed_arrays | RunInference(handler)
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from beam_dl.models import checkpoints
from beam_dl.serving.devices import Placement, round_buckets
from beam_dl.serving.oom import call_with_oom_split

METRICS_NAMESPACE = 'BeamDL_Jax'
# Set before the JAX backend starts in each worker: without it every SDK
# worker process on a GPU host grabs 75% of the device memory up front.
DEFAULT_ENV_VARS = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
DEFAULT_LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)
_log = logging.getLogger(__name__)
# Loaded models are cached by Beam alone: RunInference keeps them in its
# `shared.Shared` (one per step, process and model tag) or, with large_model /
# share_model_across_processes, in one multi_process_shared server per
# `model_identifier`. The handler keeps no model cache of its own.
#
# What it does keep per process is one string per handler: the model
# directory it last loaded (its `_id` is shared by all its unpickled copies).
# Runners re-create DoFns -- and so handler copies -- per bundle (the
# streaming DirectRunner tears each down after its bundle); a refresh that
# fails in a fresh copy must fall back to the model the step was serving,
# not the constructor's. Beam's `shared.Shared` cannot hold this: it keeps an
# object only while something references it, and RunInference's own
# `load_model_status` acquires a new Shared at every DoFn setup, which drops
# Shared's keep-alive of the previous model (tested by
# test_model_refresh.test_streaming_refresh_with_test_stream). No model is
# held here: a fresh copy reloads the directory.
_LAST_GOOD: dict[str, str] = {}
_LAST_GOOD_LOCK = threading.Lock()
# Per thread: where a running predict() reports its counts (see ServeCounts).
_COUNTING = threading.local()
# Per thread: where a running predict() may leave the read of its outputs for
# later (see `deferred_reads`).
_DEFERRING = threading.local()


def power_of_two_buckets(max_batch_size: int) -> tuple[int, ...]:
  """1, 2, 4, ... up to and including max_batch_size: padding wastes < 2x."""
  sizes, size = [], 1
  while size < max_batch_size:
    sizes.append(size)
    size *= 2
  return tuple(sizes) + (max_batch_size,)


def full_batches_by_default(
  min_batch_size: Optional[int], max_batch_size: int, max_batch_duration_secs: Optional[int]
) -> Optional[int]:
  """The min_batch_size handed to BatchElements: as given, else max_batch_size.

  Beam's adaptive sizing starts at 1 and fits batch time against size; the
  first batches of each padded bucket include an XLA compile, so it measured
  big batches as slow and settled at 4-13 images (bench_flagship: 0.3 of a
  plain loop). Full batches (a bundle's last one may be short) compile one
  bucket and run the model at its best. With max_batch_duration_secs
  (streaming latency bound) Beam's own default stays.
  """
  if min_batch_size is not None or max_batch_duration_secs is not None:
    return min_batch_size
  return max_batch_size


def bucket_for(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n (buckets sorted); n must be <= buckets[-1]."""
  return buckets[bisect.bisect_left(buckets, n)]


class BatchShapes:
  """Which padded batch shape each call runs in, per model, across threads.

  A batch size seen for the first time runs in the smallest larger bucket
  already compiled, when there is one at most twice its own (so the padded
  forward pass costs at most one more of its own), and gets its own bucket
  (a compile) only when that size comes back. A bundle's short last batch,
  or a streaming batch of an odd size, then costs some padding instead of an
  XLA compile (0.1-0.3 s on CPU for bench_flagship's SmallCNN, seconds for a
  large model on a GPU) that nothing else would use. Sizes that recur
  compile as before. `key` separates shapes that are not interchangeable (a
  sequence batch's padded length).
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._compiled: set = set()
    self._seen: set = set()

  def rows_for(self, n: int, buckets: Sequence[int], key: Any = None) -> int:
    natural = bucket_for(n, buckets)
    with self._lock:
      if (natural, key) in self._compiled:
        return natural
      if (natural, key) not in self._seen:
        self._seen.add((natural, key))
        larger = [b for b in buckets if natural < b <= 2 * natural and (b, key) in self._compiled]
        if larger:
          return larger[0]
      self._compiled.add((natural, key))
      return natural

  def __getstate__(self):  # the lock stays behind: a copy starts with nothing compiled
    return {}

  def __setstate__(self, state):
    self.__init__()


def length_buckets_up_to(length: int, buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS) -> tuple[int, ...]:
  """The `buckets` a sequence of at most `length` steps can pad to: those below it and the one that holds it."""
  return tuple(b for b in buckets if b < length) + (length_bucket_for(length, buckets),)


def length_bucket_for(length: int, buckets: Sequence[int]) -> int:
  """Smallest length bucket >= length; past the largest, a multiple of it."""
  if length <= buckets[-1]:
    return bucket_for(max(length, 1), buckets)
  return -(-length // buckets[-1]) * buckets[-1]


def model_dir_for(path: str) -> str:
  """The model directory for a path a model watcher reports.

  `WatchFilePattern` emits file paths, so a refresh may name the directory
  itself, its spec.json, its variables.msgpack or a file inside its orbax
  variables/ directory; all mean the same model directory.
  """
  path = path.rstrip('/')
  base = os.path.basename(path)
  if base in (checkpoints.SPEC_FILE, checkpoints.MSGPACK_FILE, checkpoints.ORBAX_DIR):
    return os.path.dirname(path)
  marker = f'/{checkpoints.ORBAX_DIR}/'
  if marker in path:
    return path[: path.rindex(marker)]
  return path


@dataclasses.dataclass
class ServeCounts:
  """What serving some examples cost: forward-pass traces (`compiles`, one
  per new padded shape) and padded / total input slots (rows, or rows x
  steps for sequences).

  Returned by `LoadedModel.predict_counted` for the examples of that call
  only, never accumulated on the shared model: many threads call one model,
  and a running total read before and after a call would mix their counts.
  """

  compiles: int = 0
  padded_slots: int = 0
  total_slots: int = 0

  def add(self, other: 'ServeCounts') -> None:
    self.compiles += other.compiles
    self.padded_slots += other.padded_slots
    self.total_slots += other.total_slots


class _Counting:
  """Collects the counts of every predict() this thread runs inside the block
  (a custom inference_fn may call predict several times, or not at all)."""

  def __init__(self):
    self.counts = ServeCounts()

  def __enter__(self) -> ServeCounts:
    stack = _COUNTING.__dict__.setdefault('stack', [])
    stack.append(self.counts)
    return self.counts

  def __exit__(self, *exc):
    _COUNTING.stack.pop()


def _report(counts: ServeCounts) -> None:
  """Adds `counts` to the innermost collector of this thread, if any."""
  stack = _COUNTING.__dict__.get('stack')
  if stack:
    stack[-1].add(counts)


class deferred_reads:  # pylint: disable=invalid-name  # used as a context manager, like a function
  """Inside the block, `LoadedModel.predict` on this thread returns as soon
  as the forward pass is dispatched (JAX dispatches asynchronously), with its
  outputs in a host buffer that is filled only when the caller runs the reads
  collected here (a list of no-argument callables; each blocks until its
  forward pass is done, and may raise the error the computation hit).

  Why: the caller (the dispatch-ahead RunInference step,
  transforms.inference) dispatches batch k, then reads and emits batch k-1
  while the model computes batch k, as a hand-written loop does; everything
  the bundle's thread does per batch (batching, formatting, writing, the next
  batch's assembly) then overlaps the forward pass instead of adding to it.
  Nobody outside the block ever sees an unfilled buffer: predict calls made
  elsewhere (another thread, or no block) read their outputs before returning.

  `enabled=False` opens a block where predict reads at once again (the
  handler runs a custom inference_fn in one: it may use the outputs).
  """

  def __init__(self, enabled: bool = True):
    self.reads: Optional[list[Callable[[], None]]] = [] if enabled else None

  def __enter__(self) -> Optional[list[Callable[[], None]]]:
    _DEFERRING.__dict__.setdefault('stack', []).append(self.reads)
    return self.reads

  def __exit__(self, *exc):
    _DEFERRING.stack.pop()


def _deferring() -> bool:
  """Whether this thread is inside an enabled `deferred_reads` block."""
  stack = _DEFERRING.__dict__.get('stack')
  return bool(stack) and stack[-1] is not None


def _defer(read: Callable[[], None]) -> bool:
  """Hands `read` to the innermost enabled `deferred_reads` block of this
  thread; False (the caller reads now) when there is none."""
  if not _deferring():
    return False
  _DEFERRING.stack[-1].append(read)
  return True


def _read_into(outputs: np.ndarray, pending: Sequence[tuple[int, int, Any]]) -> None:
  """Copies each dispatched chunk's rows [start, start + n) into `outputs`
  (blocks until each chunk's forward pass is done)."""
  for start, n, out in pending:
    outputs[start : start + n] = np.asarray(out)[:n]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model ready to serve: module, device-resident variables, jitted forward.

  Immutable once loaded, so one copy serves every thread of the process
  (Beam runs many bundles at once in one SDK worker). Counts come back from
  each call (`predict_counted`), not from the model. `model_id()` and
  `predict_counted` also work when the model lives in another process
  (large_model).
  """

  spec: checkpoints.ModelSpec
  model_dir: str
  variables: Any
  forward: Callable
  batch_buckets: tuple[int, ...]
  length_buckets: tuple[int, ...]
  num_bytes: int
  placement: Optional[Placement] = None
  shapes: BatchShapes = dataclasses.field(default_factory=BatchShapes, compare=False, repr=False)

  def predict(self, examples: Sequence[np.ndarray]) -> np.ndarray:
    """Outputs for `examples` in order (see `predict_counted`); the counts go
    to the caller's collector (the handler's run_inference)."""
    outputs, counts = self.predict_counted(examples)
    _report(counts)
    return outputs

  def predict_counted(self, examples: Sequence[np.ndarray]) -> tuple[np.ndarray, ServeCounts]:
    """(outputs for `examples` in order, what this call cost).

    Chunks of at most the largest bucket, each padded up to its bucket;
    every chunk is dispatched before any result is read, so host batch
    assembly overlaps device compute. Inside a `deferred_reads` block the
    outputs come back unread (see there). Safe to call from many threads.
    """
    largest = self.batch_buckets[-1]
    pending = []
    with _Counting() as counts:  # traces of `forward` report here
      for start in range(0, len(examples), largest):
        chunk = examples[start : start + largest]
        inputs, padded, total = self._assemble(chunk)
        counts.add(ServeCounts(padded_slots=padded, total_slots=total))
        if self.placement is not None:
          inputs = self.placement.put_batch(inputs)
        pending.append((start, len(chunk), self.forward(self.variables, *inputs)))
    if len(pending) == 1 and not _deferring():
      _, n, out = pending[0]
      return np.asarray(out)[:n], counts
    first = pending[0][2]
    outputs = np.empty((len(examples), *first.shape[1:]), first.dtype)  # shape and dtype known before the values
    if not _defer(lambda: _read_into(outputs, pending)):
      _read_into(outputs, pending)
    return outputs, counts

  def model_id(self) -> str:
    return self.model_dir

  def _assemble(self, chunk: Sequence[np.ndarray]) -> tuple[tuple[np.ndarray, ...], int, int]:
    """(one padded host array (+ mask for sequences), padded slots, total
    slots), filled without stacking; its shape chosen by `BatchShapes`."""
    dtype = np.dtype(self.spec.input_dtype)
    if not self.spec.is_sequence:
      rows = self.shapes.rows_for(len(chunk), self.batch_buckets)
      expected = tuple(self.spec.input_shape)
      batch = np.zeros((rows, *expected), dtype)
      for i, example in enumerate(chunk):
        if example.shape != expected:
          raise ValueError(f'example {i} has shape {example.shape}, model expects {expected}')
        batch[i] = example
      return (batch,), rows - len(chunk), rows
    feature_shape = tuple(self.spec.input_shape[1:])
    length = length_bucket_for(max(len(e) for e in chunk), self.length_buckets)
    rows = self.shapes.rows_for(len(chunk), self.batch_buckets, key=length)
    batch = np.zeros((rows, length, *feature_shape), dtype)
    mask = np.zeros((rows, length), bool)
    for i, example in enumerate(chunk):
      if example.shape[1:] != feature_shape:
        raise ValueError(f'example {i} has step shape {example.shape[1:]}, model expects {feature_shape}')
      batch[i, : len(example)] = example
      mask[i, : len(example)] = True
    return (batch, mask), rows * length - int(sum(len(e) for e in chunk)), rows * length


def compile_every_shape(model: LoadedModel) -> int:
  """Runs `model` once on zeros in each padded shape it can be called in (batch buckets, times length
  buckets for sequence models), so no batch compiles later; returns how many shapes compiled."""
  start = time.perf_counter()
  lengths = model.length_buckets if model.spec.is_sequence else (None,)
  compiles = 0
  for length in lengths:
    shape = (length, *model.spec.input_shape[1:]) if length else tuple(model.spec.input_shape)
    example = np.zeros(shape, np.dtype(model.spec.input_dtype))
    for rows in model.batch_buckets:
      compiles += model.predict_counted([example] * rows)[1].compiles
  _log.info('compiled %s for %d padded shapes in %.1f s', model.model_dir, compiles, time.perf_counter() - start)
  return compiles


def default_inference_fn(
  model: LoadedModel,
  batch: Sequence[np.ndarray],
  inference_args: Optional[Mapping[str, Any]] = None,
) -> np.ndarray:
  """The model's outputs for a batch, one row per example."""
  del inference_args
  return model.predict(batch)


class JaxModelHandler(ModelHandler[np.ndarray, PredictionResult, LoadedModel]):
  """Serves a beam_dl Flax model directory in Beam's RunInference.

  Args:
    model_dir: a directory written by `beam_dl.models.checkpoints.save` (local or
      any Beam filesystem).
    max_batch_size: largest batch handed to the model; also the largest
      padded bucket.
    batch_buckets: padded batch sizes (default powers of two up to
      max_batch_size); one compile each at most.
    length_buckets: padded sequence lengths for sequence models.
    precision: 'float32' or 'bfloat16' compute (parameters stay float32).
    device: 'cpu', 'gpu' or 'tpu'; default is JAX's default backend.
    data_parallel: split every batch over all devices of the backend
      (variables replicated; buckets rounded up to a multiple of the device
      count).
    model_parallelism: > 1 splits wide parameters over a 'model' mesh axis
      of this size (the rest of the devices split the batch).
    split_on_oom: on an XLA RESOURCE_EXHAUSTED error, retry the batch as two
      halves, recursively (counted as 'oom_splits').
    memory_fraction: XLA_PYTHON_CLIENT_MEM_FRACTION for each worker process,
      for several processes sharing one GPU; by default JAX allocates on
      demand (XLA_PYTHON_CLIENT_PREALLOCATE=false).
    resource_hints: Beam resource hints for the RunInference step, e.g.
      {'min_ram': '16GB', 'accelerator': 'type:nvidia-l4;count:1;install-nvidia-driver'}.
    inference_fn: (LoadedModel, examples, inference_args) -> outputs array;
      swap it to post-process on device or call another method. It receives
      `inference_args`; the default takes none.
    min_batch_size: smallest batch BatchElements forms (default
      max_batch_size: full batches, see `full_batches_by_default`).
    compile_ahead: compile the forward pass for every padded shape (each
      batch bucket, times each length bucket for sequence models) when the
      model loads, instead of on the first batch of each shape. For
      streaming, where batches come in every size and a compile mid-stream
      stalls the step for its duration (a backlog that takes seconds to
      clear); give sequence models only the `length_buckets` their input
      can reach.
    max_batch_duration_secs, large_model, model_copies,
      env_vars, batch_length_fn, batch_bucket_boundaries: as in Beam's
      ModelHandler (max_batch_weight is refused: it crashes Beam 2.77's
      BatchElements).
  """

  def __init__(
    self,
    model_dir: str,
    *,
    max_batch_size: int = 256,
    min_batch_size: Optional[int] = None,
    max_batch_duration_secs: Optional[int] = None,
    batch_buckets: Optional[Sequence[int]] = None,
    length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
    precision: str = 'float32',
    device: Optional[str] = None,
    data_parallel: bool = False,
    model_parallelism: int = 1,
    split_on_oom: bool = True,
    memory_fraction: Optional[float] = None,
    resource_hints: Optional[Mapping[str, Any]] = None,
    inference_fn: Callable[..., np.ndarray] = default_inference_fn,
    large_model: bool = False,
    model_copies: Optional[int] = None,
    compile_ahead: bool = False,
    **kwargs,
  ):
    if precision not in ('float32', 'bfloat16'):
      raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
    if device not in (None, 'cpu', 'gpu', 'tpu'):
      raise ValueError(f"device must be None, 'cpu', 'gpu' or 'tpu', got {device!r}")
    if model_parallelism < 1:
      raise ValueError(f'model_parallelism must be >= 1, got {model_parallelism}')
    if memory_fraction is not None and not 0 < memory_fraction <= 1:
      raise ValueError(f'memory_fraction must be in (0, 1], got {memory_fraction}')
    if kwargs.get('max_batch_weight') is not None:
      raise ValueError('max_batch_weight is not supported: it crashes BatchElements in Beam 2.77')
    buckets = tuple(sorted(batch_buckets or power_of_two_buckets(max_batch_size)))
    if buckets[-1] != max_batch_size:
      raise ValueError(f'largest batch bucket {buckets[-1]} must equal max_batch_size {max_batch_size}')
    user_env = dict(kwargs.pop('env_vars', None) or {})
    super().__init__(
      min_batch_size=full_batches_by_default(min_batch_size, max_batch_size, max_batch_duration_secs),
      max_batch_size=max_batch_size,
      max_batch_duration_secs=max_batch_duration_secs,
      large_model=large_model,
      model_copies=model_copies,
      env_vars=user_env,
      **kwargs,
    )
    self._default_env = dict(DEFAULT_ENV_VARS)
    if memory_fraction is not None:
      self._default_env['XLA_PYTHON_CLIENT_MEM_FRACTION'] = str(memory_fraction)
    self._model_dir = model_dir
    self._batch_buckets = buckets
    self._length_buckets = tuple(sorted(length_buckets))
    self._precision = precision
    self._device = device
    self._data_parallel = data_parallel
    self._model_parallelism = model_parallelism
    self._split_on_oom = split_on_oom
    self._resource_hints = dict(resource_hints or {})
    self._inference_fn = inference_fn
    self._compile_ahead = compile_ahead
    self._initial_dir = model_dir
    self._id = uuid.uuid4().hex  # pickled: every copy of this handler shares _LAST_GOOD[_id]
    self._compiles = Metrics.counter(METRICS_NAMESPACE, 'jit_compiles')
    self._oom_splits = Metrics.counter(METRICS_NAMESPACE, 'oom_splits')
    self._padded_slots = Metrics.counter(METRICS_NAMESPACE, 'padded_slots')
    self._total_slots = Metrics.counter(METRICS_NAMESPACE, 'input_slots')
    self._padding_percent = Metrics.distribution(METRICS_NAMESPACE, 'padding_percent')
    self._load_failures = Metrics.counter(METRICS_NAMESPACE, 'model_load_failures')
    self._loads = Metrics.counter(METRICS_NAMESPACE, 'model_loads')
    self._init_process_state()

  def _init_process_state(self):
    """State of this copy in this process, never pickled: load counts not
    yet reported (loads mostly happen in DoFn.setup, outside any bundle,
    where metrics are dropped, so they are reported with the next batch),
    and the model this copy served last (the fallback of a refresh that
    fails, without a reload). A lock, because Beam may load (setup,
    side-input refresh) and infer from different threads."""
    self._lock = threading.Lock()
    self._last_good: Optional[LoadedModel] = None
    self._unreported_loads = 0
    self._unreported_load_failures = 0

  def __getstate__(self):
    state = dict(self.__dict__)
    for name in ('_lock', '_last_good', '_unreported_loads', '_unreported_load_failures'):
      state.pop(name)  # device arrays and locks stay in the process that made them
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_process_state()

  def set_environment_vars(self):
    """JAX memory defaults unless the environment already says otherwise,
    then the user's env_vars (which always win). Runs in DoFn.setup, before
    this process first touches a JAX backend."""
    self._set_default_env()
    super().set_environment_vars()

  def _set_default_env(self):
    for name, value in self._default_env.items():
      os.environ.setdefault(name, value)

  def load_model(self) -> LoadedModel:
    """Loads the current model_dir. If that fails after a refresh (a broken,
    half-written or mismatched checkpoint), logs the error, counts
    'model_load_failures' and keeps serving the last model this copy loaded
    (in a fresh worker: the constructor's model_dir) instead of failing. A
    model that failed to load never becomes the last good one."""
    self._set_default_env()  # also when wrapped (Keyed...), whose setup skips ours
    model_dir = self._model_dir
    try:
      model = self._load(model_dir)
    except Exception as e:
      with self._lock:
        last_good = self._last_good
      with _LAST_GOOD_LOCK:
        fallback = _LAST_GOOD.get(self._id, self._initial_dir)
      if fallback == model_dir:
        raise  # nothing else to serve: the job must not start with a broken model
      with self._lock:
        self._unreported_load_failures += 1
      _log.error('cannot load refreshed model %s, still serving %s: %s', model_dir, fallback, e)
      model = last_good if last_good is not None and last_good.model_dir == fallback else self._load(fallback)
    with self._lock:
      self._last_good = model
    with _LAST_GOOD_LOCK:
      _LAST_GOOD[self._id] = model.model_dir
    return model

  def _load(self, model_dir: str) -> LoadedModel:
    """The model in model_dir, loaded now (counted as 'model_loads')."""
    model = self._load_uncached(model_dir)
    with self._lock:
      self._unreported_loads += 1
    return model

  def _load_uncached(self, model_dir: str) -> LoadedModel:
    import jax
    import jax.numpy as jnp

    spec, variables = checkpoints.load(model_dir)
    overrides = {'dtype': jnp.bfloat16} if self._precision == 'bfloat16' else {}
    module = spec.build(**overrides)
    placement = Placement.create(self._device, self._data_parallel, self._model_parallelism)
    variables = placement.put_variables(variables, module, spec.example_inputs())

    def forward(variables, x, *rest):
      _report(ServeCounts(compiles=1))  # Python side effect: runs once per trace
      return module.apply(variables, spec.normalize(x), *rest)

    model = LoadedModel(
      spec=spec,
      model_dir=model_dir,
      variables=variables,
      forward=jax.jit(forward),  # runs where its committed inputs live
      batch_buckets=round_buckets(self._batch_buckets, placement.data_size),
      length_buckets=self._length_buckets,
      num_bytes=sum(x.nbytes for x in jax.tree_util.tree_leaves(variables)),
      placement=placement if placement.mesh is not None else None,
    )
    _log.info('loaded %s (%s, %.1f MB) on %s', model_dir, spec.name, model.num_bytes / 1e6, placement.describe())
    if self._compile_ahead:
      compile_every_shape(model)
    return model

  def run_inference(
    self,
    batch: Sequence[np.ndarray],
    model: LoadedModel,
    inference_args: Optional[Mapping[str, Any]] = None,
  ) -> Iterable[PredictionResult]:
    """One PredictionResult per example, in order. Metrics count exactly
    this call's compiles and padding (returned by the model, not read from
    totals that other threads move)."""
    self._report_loads()
    counts = ServeCounts()

    def infer(examples):
      if self._inference_fn is default_inference_fn:
        outputs, used = model.predict_counted(examples)  # also through a large_model proxy
        counts.add(used)
        return outputs
      with _Counting() as used, deferred_reads(enabled=False):  # it may read the outputs
        outputs = self._inference_fn(model, examples, inference_args)
      counts.add(used)
      return outputs

    if self._split_on_oom:
      outputs = call_with_oom_split(infer, batch, on_split=lambda size: self._oom_splits.inc())
    else:
      outputs = infer(batch)
    if len(outputs) != len(batch):  # zip would silently drop the rest
      raise ValueError(f'inference_fn returned {len(outputs)} outputs for {len(batch)} examples')
    if counts.compiles:
      self._compiles.inc(counts.compiles)
    if counts.total_slots:
      self._padded_slots.inc(counts.padded_slots)
      self._total_slots.inc(counts.total_slots)
      self._padding_percent.update(round(100 * counts.padded_slots / counts.total_slots))
    model_id = model.model_id()
    return [PredictionResult(example, output, model_id) for example, output in zip(batch, outputs)]

  def _report_loads(self):
    with self._lock:
      loads, failures = self._unreported_loads, self._unreported_load_failures
      self._unreported_loads = self._unreported_load_failures = 0
    if loads:
      self._loads.inc(loads)
    if failures:
      self._load_failures.inc(failures)

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    """Array bytes, not pickled size: Beam's default pickles every batch."""
    return sum(np.asarray(x).nbytes for x in batch)

  def get_metrics_namespace(self) -> str:
    return METRICS_NAMESPACE

  def get_resource_hints(self) -> dict:
    return dict(self._resource_hints)

  def validate_inference_args(self, inference_args: Optional[dict[str, Any]]):
    """inference_args go to `inference_fn`; the default one takes none, so
    passing some without a custom inference_fn is a mistake caught here."""
    if inference_args and self._inference_fn is default_inference_fn:
      raise ValueError(
        f'inference_args {sorted(inference_args)} given, but the default inference_fn takes none; '
        'pass inference_fn=fn(model, batch, inference_args)'
      )

  def update_model_path(self, model_path: Optional[str] = None):
    """Points the next load at `model_path` (a model dir or a file in one)."""
    if model_path:
      self._model_dir = model_dir_for(model_path)

  @property
  def model_dir(self) -> str:
    return self._model_dir
