"""How state and batches are placed on devices: `jax.jit` + mesh, or `pmap`.

`MeshStrategy` is the main path (what used to be pjit): the state is built
the standard way -- `jax.eval_shape(init)` -> logical partition specs ->
mesh shardings -> `jax.jit(init, out_shardings=...)` -- and the train step is
`jax.jit` with in/out shardings and a donated state. The sharding mode
(data parallel, FSDP, tensor parallel) is only a choice of rules. Eval sums
are reduced per device with `jax.shard_map` + `psum` over 'data'.

`PmapStrategy` is the legacy `jax.pmap` data-parallel path for code bases
still on pmap: replicated state, batches reshaped to [devices, per_device].
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from beam_dl.models import build as build_model
from beam_dl.training import losses, sharding, steps
from beam_dl.training import state as state_lib
from beam_dl.training.config import TrainConfig


def training_model(cfg: TrainConfig) -> nn.Module:
  """The configured module; with `compression.qat`, wrapped for
  quantization-aware training (same parameter tree)."""
  model = build_model(cfg.model, **cfg.model_kwargs)
  if cfg.compression.qat:
    from beam_dl.compression import quantize

    model = quantize.qat_module(model, cfg.compression.qat)
  return model


class MeshStrategy:
  """jit + Mesh + NamedSharding for params, optimizer state and batches."""

  def __init__(self, cfg: TrainConfig, devices=None):
    self.cfg = cfg
    self.mesh = sharding.make_mesh(cfg.sharding, devices)
    self.rules = cfg.sharding.logical_rules()
    self.model = training_model(cfg)
    self.tx = state_lib.make_optimizer(cfg)
    init_boxed = state_lib.make_init_fn(cfg, self.model, self.tx, boxed=True)
    self._init = state_lib.make_init_fn(cfg, self.model, self.tx, boxed=False)
    rng = jax.random.key(cfg.seed)
    boxed = jax.eval_shape(init_boxed, rng)
    self.abstract_state = jax.eval_shape(self._init, rng)
    logical = nn.get_partition_spec(boxed)
    self.state_sharding = sharding.logical_to_shardings(logical, self.abstract_state, self.mesh, self.rules)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.data_size = self.mesh.shape[sharding.DATA]
    repl = sharding.replicated(self.mesh)
    self._train_step = jax.jit(
      functools.partial(steps.train_step, cfg),
      in_shardings=(self.state_sharding, self.batch_sharding),
      out_shardings=(self.state_sharding, repl),
      donate_argnums=(0,),
    )
    reduce = jax.shard_map(
      functools.partial(_psum_sums, task=cfg.task),
      mesh=self.mesh,
      in_specs=(P(sharding.DATA), P(sharding.DATA), P(sharding.DATA)),
      out_specs=P(),
    )

    def eval_sums(state, batch):
      outputs, per_ex = steps.eval_outputs(cfg, state, batch)
      return reduce(outputs, per_ex, batch)

    self._eval_sums = jax.jit(eval_sums, in_shardings=(self.state_sharding, self.batch_sharding), out_shardings=repl)

  def create_state(self):
    """The initial state, created directly in its sharded layout."""
    init = jax.jit(self._init, out_shardings=self.state_sharding)
    return init(jax.random.key(self.cfg.seed))

  def shard_shapes(self) -> dict[str, tuple]:
    """{'tree path': per-device shard shape} of the whole train state."""
    return sharding.describe(self.state_sharding, self.abstract_state)

  def put(self, batch: dict):
    return sharding.shard_batch(batch, self.mesh)

  def train_step(self, state, batch):
    return self._train_step(state, batch)

  def eval_sums(self, state, batch):
    return self._eval_sums(state, batch)

  # Checkpointing: orbax saves/restores the sharded state as is.
  def to_checkpoint(self, state):
    return state

  def restore_target(self):
    return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      self.abstract_state,
      self.state_sharding,
    )

  def from_checkpoint(self, restored):
    return restored

  def host_variables(self, state) -> dict:
    """Unsharded variables for export (gathered across processes if needed)."""
    variables = {'params': state.params}
    if jax.tree_util.tree_leaves(state.batch_stats):
      variables['batch_stats'] = state.batch_stats
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      variables = multihost_utils.process_allgather(variables, tiled=True)
    return jax.device_get(variables)


def _psum_sums(outputs, per_ex, batch, *, task):
  """Per-device metric sums, added across the 'data' axis (shard_map body)."""
  sums = losses.metric_sums(outputs, batch, task, per_ex)
  return jax.tree_util.tree_map(lambda s: jax.lax.psum(s, sharding.DATA), sums)


class PmapStrategy:
  """Legacy data parallelism with `jax.pmap` (replicated state)."""

  AXIS = 'batch'

  def __init__(self, cfg: TrainConfig, devices=None):
    self.cfg = cfg
    self.devices = list(jax.local_devices() if devices is None else devices)
    self.data_size = len(self.devices)
    self.model = training_model(cfg)
    self.tx = state_lib.make_optimizer(cfg)
    self._init = state_lib.make_init_fn(cfg, self.model, self.tx, boxed=False)
    self.abstract_state = jax.eval_shape(self._init, jax.random.key(cfg.seed))
    self._train_step = jax.pmap(
      functools.partial(steps.train_step, cfg, axis_name=self.AXIS),
      axis_name=self.AXIS,
      devices=self.devices,
      donate_argnums=(0,),
    )

    def eval_sums(state, batch):
      outputs, per_ex = steps.eval_outputs(cfg, state, batch)
      sums = losses.metric_sums(outputs, batch, cfg.task, per_ex)
      return jax.lax.psum(sums, self.AXIS)

    self._eval_sums = jax.pmap(eval_sums, axis_name=self.AXIS, devices=self.devices)

  def create_state(self):
    return self._replicate(jax.jit(self._init)(jax.random.key(self.cfg.seed)))

  def _replicate(self, tree):
    return jax.device_put(
      jax.tree_util.tree_map(lambda x: jnp.stack([x] * self.data_size), tree),
      jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(self.devices), (self.AXIS,)), P(self.AXIS)),
    )

  def put(self, batch: dict):
    n = self.data_size

    # pmap takes [devices, per_device, ...] host arrays and splits axis 0.
    return jax.tree_util.tree_map(lambda x: np.asarray(x).reshape((n, -1) + x.shape[1:]), batch)

  def train_step(self, state, batch):
    new_state, metrics = self._train_step(state, batch)
    return new_state, jax.tree_util.tree_map(lambda m: m[0], metrics)

  def eval_sums(self, state, batch):
    return jax.tree_util.tree_map(lambda s: s[0], self._eval_sums(state, batch))

  def to_checkpoint(self, state):
    return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], state))

  def restore_target(self):
    return self.abstract_state

  def from_checkpoint(self, restored):
    return self._replicate(restored)

  def host_variables(self, state) -> dict:
    single = jax.device_get(jax.tree_util.tree_map(lambda x: x[0], state))
    variables = {'params': single.params}
    if jax.tree_util.tree_leaves(single.batch_stats):
      variables['batch_stats'] = single.batch_stats
    return variables


def make_strategy(cfg: TrainConfig, devices=None):
  if cfg.sharding.mode == 'pmap':
    if jax.process_count() > 1:
      raise ValueError(
        f'sharding.mode=pmap runs in one process, this run has {jax.process_count()}: '
        "use dp, fsdp or tensor (jit over a mesh of every process's devices)"
      )
    return PmapStrategy(cfg, devices)
  return MeshStrategy(cfg, devices)
