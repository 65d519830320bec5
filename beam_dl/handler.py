"""`JaxModelHandler`: Beam RunInference for Flax models saved by beam_dl.

Loads `beam_dl.checkpoints` model directories (orbax or msgpack; never
pickle), compiles the forward pass once per padded batch shape, and returns
one `PredictionResult` per example with the padding stripped.

    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    handler = KeyedModelHandler(JaxModelHandler('gs://bucket/model'))
    predictions = keyed_arrays | RunInference(handler)
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from beam_dl import checkpoints

METRICS_NAMESPACE = 'BeamDL_Jax'
DEFAULT_LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024)
_log = logging.getLogger(__name__)


def power_of_two_buckets(max_batch_size: int) -> tuple[int, ...]:
  """1, 2, 4, ... up to and including max_batch_size: padding wastes < 2x."""
  sizes, size = [], 1
  while size < max_batch_size:
    sizes.append(size)
    size *= 2
  return tuple(sizes) + (max_batch_size,)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n (buckets sorted); n must be <= buckets[-1]."""
  return buckets[bisect.bisect_left(buckets, n)]


def length_bucket_for(length: int, buckets: Sequence[int]) -> int:
  """Smallest length bucket >= length; past the largest, a multiple of it."""
  if length <= buckets[-1]:
    return bucket_for(max(length, 1), buckets)
  return -(-length // buckets[-1]) * buckets[-1]


@dataclasses.dataclass
class LoadedModel:
  """A model ready to serve: module, device-resident variables, jitted forward.

  `compiles` counts traces of the forward pass: one per distinct padded
  shape, so it stays bounded by the number of buckets.
  """

  spec: checkpoints.ModelSpec
  model_dir: str
  variables: Any
  forward: Callable
  batch_buckets: tuple[int, ...]
  length_buckets: tuple[int, ...]
  num_bytes: int
  compiles: int = 0

  def predict(self, examples: Sequence[np.ndarray]) -> np.ndarray:
    """Outputs for `examples` in order: chunks of at most the largest bucket,
    each padded up to its bucket; every chunk is dispatched before any
    result is read, so host batch assembly overlaps device compute."""
    largest = self.batch_buckets[-1]
    pending = []
    for start in range(0, len(examples), largest):
      chunk = examples[start : start + largest]
      inputs = self._assemble(chunk)
      pending.append((len(chunk), self.forward(self.variables, *inputs)))
    return np.concatenate([np.asarray(out)[:n] for n, out in pending], axis=0)

  def _assemble(self, chunk: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """One padded host array (+ mask for sequences), filled without stacking."""
    rows = bucket_for(len(chunk), self.batch_buckets)
    dtype = np.dtype(self.spec.input_dtype)
    if not self.spec.is_sequence:
      expected = tuple(self.spec.input_shape)
      batch = np.zeros((rows, *expected), dtype)
      for i, example in enumerate(chunk):
        if example.shape != expected:
          raise ValueError(f'example {i} has shape {example.shape}, model expects {expected}')
        batch[i] = example
      return (batch,)
    feature_shape = tuple(self.spec.input_shape[1:])
    length = length_bucket_for(max(len(e) for e in chunk), self.length_buckets)
    batch = np.zeros((rows, length, *feature_shape), dtype)
    mask = np.zeros((rows, length), bool)
    for i, example in enumerate(chunk):
      if example.shape[1:] != feature_shape:
        raise ValueError(
            f'example {i} has step shape {example.shape[1:]}, model expects {feature_shape}'
        )
      batch[i, : len(example)] = example
      mask[i, : len(example)] = True
    return batch, mask


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
    model_dir: a directory written by `beam_dl.checkpoints.save` (local or
      any Beam filesystem).
    max_batch_size: largest batch handed to the model; also the largest
      padded bucket.
    batch_buckets: padded batch sizes (default powers of two up to
      max_batch_size); one compile each at most.
    length_buckets: padded sequence lengths for sequence models.
    precision: 'float32' or 'bfloat16' compute (parameters stay float32).
    device: 'cpu', 'gpu' or 'tpu'; default is JAX's default backend.
    inference_fn: (LoadedModel, examples, inference_args) -> outputs array;
      swap it to post-process on device or call another method.
    min_batch_size, max_batch_duration_secs, large_model, model_copies,
      env_vars: as in Beam's ModelHandler.
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
      inference_fn: Callable[..., np.ndarray] = default_inference_fn,
      large_model: bool = False,
      model_copies: Optional[int] = None,
      **kwargs,
  ):
    if precision not in ('float32', 'bfloat16'):
      raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
    if device not in (None, 'cpu', 'gpu', 'tpu'):
      raise ValueError(f"device must be None, 'cpu', 'gpu' or 'tpu', got {device!r}")
    buckets = tuple(sorted(batch_buckets or power_of_two_buckets(max_batch_size)))
    if buckets[-1] != max_batch_size:
      raise ValueError(f'largest batch bucket {buckets[-1]} must equal max_batch_size {max_batch_size}')
    super().__init__(
        min_batch_size=min_batch_size,
        max_batch_size=max_batch_size,
        max_batch_duration_secs=max_batch_duration_secs,
        large_model=large_model,
        model_copies=model_copies,
        **kwargs,
    )
    self._model_dir = model_dir
    self._batch_buckets = buckets
    self._length_buckets = tuple(sorted(length_buckets))
    self._precision = precision
    self._device = device
    self._inference_fn = inference_fn
    self._compiles = Metrics.counter(METRICS_NAMESPACE, 'jit_compiles')

  def load_model(self) -> LoadedModel:
    import jax
    import jax.numpy as jnp

    spec, variables = checkpoints.load(self._model_dir)
    overrides = {'dtype': jnp.bfloat16} if self._precision == 'bfloat16' else {}
    module = spec.build(**overrides)
    device = jax.devices(self._device)[0] if self._device else jax.devices()[0]
    variables = jax.device_put(variables, device)
    model = LoadedModel(
        spec=spec,
        model_dir=self._model_dir,
        variables=variables,
        forward=None,
        batch_buckets=self._batch_buckets,
        length_buckets=self._length_buckets,
        num_bytes=sum(x.nbytes for x in jax.tree_util.tree_leaves(variables)),
    )

    def forward(variables, x, *rest):
      model.compiles += 1  # Python side effect: runs once per trace/compile
      return module.apply(variables, spec.normalize(x), *rest)

    model.forward = jax.jit(forward)  # runs where its committed inputs live
    _log.info('loaded %s (%s, %.1f MB) on %s', self._model_dir, spec.name, model.num_bytes / 1e6, device)
    return model

  def run_inference(
      self,
      batch: Sequence[np.ndarray],
      model: LoadedModel,
      inference_args: Optional[Mapping[str, Any]] = None,
  ) -> Iterable[PredictionResult]:
    compiles_before = model.compiles
    outputs = self._inference_fn(model, batch, inference_args)
    if model.compiles > compiles_before:
      self._compiles.inc(model.compiles - compiles_before)
    return [
        PredictionResult(example, output, model.model_dir)
        for example, output in zip(batch, outputs)
    ]

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    """Array bytes, not pickled size: Beam's default pickles every batch."""
    return sum(np.asarray(x).nbytes for x in batch)

  def get_metrics_namespace(self) -> str:
    return METRICS_NAMESPACE

  def update_model_path(self, model_path: Optional[str] = None):
    if model_path:
      self._model_dir = model_path

  @property
  def model_dir(self) -> str:
    return self._model_dir
