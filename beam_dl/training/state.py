"""Optimizer, train state and the model's forward pass.

`TrainState` is Flax's, plus `batch_stats` for batch-norm models. Parameters
are always float32; the model's `dtype` kwarg sets the compute dtype
(bfloat16 for mixed precision). Gradient accumulation is `optax.MultiSteps`:
every train step consumes one micro-batch and the parameters move once every
`grad_accum_steps` steps.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from beam_dl.training.config import TrainConfig


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
  updates = max(cfg.num_steps // cfg.grad_accum_steps, 1)
  warmup = min(cfg.warmup_steps, updates - 1) if updates > 1 else 0
  lr = cfg.learning_rate
  if cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, updates)
  if cfg.schedule == 'linear':
    return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, 0.0, updates - warmup)],
      [warmup],
    )
  if cfg.schedule == 'constant':
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {cfg.schedule!r}")


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  schedule = make_schedule(cfg)
  if cfg.optimizer == 'adamw':
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  elif cfg.optimizer == 'adam':
    tx = optax.adam(schedule)
  elif cfg.optimizer == 'sgd':
    tx = optax.chain(
      optax.add_decayed_weights(cfg.weight_decay) if cfg.weight_decay else optax.identity(),
      optax.sgd(schedule, momentum=0.9, nesterov=True),
    )
  else:
    raise ValueError(f"optimizer must be 'adamw', 'adam' or 'sgd', got {cfg.optimizer!r}")
  if cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  if cfg.compression.prune_sparsity:
    from beam_dl.compression import pruning

    c = cfg.compression
    updates = max(cfg.num_steps // cfg.grad_accum_steps, 1)
    end = c.prune_end_step or max(int(0.75 * updates), c.prune_start_step + 1)
    tx = optax.chain(
      tx, pruning.magnitude_pruning(c.prune_sparsity, c.prune_start_step, end, c.prune_every, c.prune_exclude)
    )
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx


def example_inputs(cfg: TrainConfig, batch: int = 1) -> tuple:
  """Dummy model inputs (x[, mask]) shaped like one batch, for init."""
  if cfg.data.is_sequence:
    shape = (batch, max(cfg.data.max_len, 1), int(cfg.data.shape[-1]))
    return jnp.zeros(shape, jnp.float32), jnp.ones(shape[:2], bool)
  return (jnp.zeros((batch,) + tuple(int(d) for d in cfg.data.shape), jnp.float32),)


def make_init_fn(cfg: TrainConfig, model: nn.Module, tx, *, boxed: bool):
  """rng -> TrainState. `boxed=True` keeps nn.Partitioned metadata (for specs)."""

  def init(rng):
    variables = model.init(rng, *example_inputs(cfg), train=False)
    if not boxed:
      variables = nn.meta.unbox(variables)
    return TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      tx=tx,
      batch_stats=variables.get('batch_stats', {}),
    )

  return init


def forward(cfg: TrainConfig, state: TrainState, params, batch: dict, *, train: bool, rng=None):
  """Model outputs (and batch-stat updates) for a batch of raw inputs.

  Inputs are scaled inside the compiled step exactly as the serving handler
  does (x * input_scale + input_offset), so training and serving agree.
  """
  x = batch['inputs'].astype(jnp.float32) * cfg.input_scale + cfg.input_offset
  args = (x, batch['mask']) if 'mask' in batch else (x,)
  variables = {'params': params}
  has_bs = bool(jax.tree_util.tree_leaves(state.batch_stats))
  if has_bs:
    variables['batch_stats'] = state.batch_stats
  kwargs = {'rngs': {'dropout': rng}} if rng is not None else {}
  if has_bs and train:
    outputs, updates = state.apply_fn(variables, *args, train=True, mutable=['batch_stats'], **kwargs)
    return outputs, updates['batch_stats']
  return state.apply_fn(variables, *args, train=train, **kwargs), state.batch_stats
