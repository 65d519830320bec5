"""The pure train and eval steps (no sharding here: the strategy jits them)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from beam_dl.compression import distill
from beam_dl.training import losses
from beam_dl.training.config import TrainConfig
from beam_dl.training.state import TrainState, forward


def per_example_loss(cfg: TrainConfig, outputs, batch):
  """The task loss; mixed with the teacher's soft loss when the batch
  carries teacher outputs (distillation; eval batches never do)."""
  if cfg.task == 'classification':
    hard = losses.classification_loss(
      outputs,
      batch['label'],
      num_classes=outputs.shape[-1],
      label_smoothing=cfg.label_smoothing,
      focal_gamma=cfg.focal_gamma,
    )
  else:
    hard = losses.regression_loss(outputs, batch['target'])
  if distill.TEACHER_KEY not in batch:
    return hard
  return distill.distillation_loss(
    hard,
    outputs,
    batch[distill.TEACHER_KEY],
    task=cfg.task,
    temperature=cfg.compression.distill_temperature,
    weight=cfg.compression.distill_weight,
    kind=cfg.compression.distill_loss,
  )


def train_step(cfg: TrainConfig, state: TrainState, batch: dict, axis_name: str | None = None):
  """One optimizer (micro-)step; returns (new state, metrics).

  The loss is the weight-averaged per-example loss. With `axis_name` (the
  pmap path) gradients, metrics and batch stats are averaged across devices;
  under jit the global batch is one array and XLA inserts the collectives.
  """
  rng = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

  def loss_fn(params):
    outputs, batch_stats = forward(cfg, state, params, batch, train=True, rng=rng)
    per_ex = per_example_loss(cfg, outputs, batch)
    w = batch['weight']
    loss = jnp.sum(per_ex * w) / jnp.maximum(jnp.sum(w), 1.0)
    return loss, (outputs, batch_stats)

  (loss, (outputs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss}
  if cfg.task == 'classification':
    correct = (jnp.argmax(outputs, -1) == batch['label']) * batch['weight']
    metrics['accuracy'] = jnp.sum(correct) / jnp.maximum(jnp.sum(batch['weight']), 1.0)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
    batch_stats = jax.lax.pmean(batch_stats, axis_name)
  metrics['grad_norm'] = optax.global_norm(grads)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return new_state, metrics


def eval_outputs(cfg: TrainConfig, state: TrainState, batch: dict):
  """(outputs, per-example loss) in inference mode."""
  outputs, _ = forward(cfg, state, state.params, batch, train=False)
  return outputs, per_example_loss(cfg, outputs, batch)
