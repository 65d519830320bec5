"""Teacher-student distillation (Hinton et al. 2015) for `pipelines.train`.

`Teacher` serves a trained model directory on the host: `add_outputs` puts
the teacher's outputs for a raw training batch under `batch['teacher']`
before the batch is sharded, so every sharding strategy (jit mesh, pmap)
sees it as one more batch field. `distillation_loss` mixes the student's
ordinary per-example loss with the soft loss:

  classification  T^2 * KL(softmax(teacher / T) || softmax(student / T))
                  (the cross-entropy's gradient, without the teacher's
                  entropy, so the soft loss reaches 0 when the student
                  matches the teacher)
  regression      MSE(student, teacher)

  loss = (1 - weight) * hard + weight * soft
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

TEACHER_KEY = 'teacher'


def soft_loss(student, teacher, *, task: str, temperature: float):
  """Per-example loss of the student against the teacher's outputs."""
  teacher = jax.lax.stop_gradient(teacher)
  if task == 'classification':
    log_student = jax.nn.log_softmax(student / temperature, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher / temperature, axis=-1)
    return optax.losses.kl_divergence_with_log_targets(log_student, log_teacher) * temperature**2
  return jnp.mean(optax.squared_error(student, teacher.reshape(student.shape)), axis=-1)


def distillation_loss(hard, student, teacher, *, task: str, temperature: float, weight: float):
  """(1 - weight) * hard + weight * soft, per example."""
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f'distillation weight must be in [0, 1], got {weight}')
  return (1.0 - weight) * hard + weight * soft_loss(student, teacher, task=task, temperature=temperature)


class Teacher:
  """A trained beam_dl model directory, run on raw batches for distillation."""

  def __init__(self, model_dir: str):
    from beam_dl import checkpoints

    self.model_dir = model_dir
    self.spec, variables = checkpoints.load(model_dir)
    self.variables = jax.device_put(variables)
    module = self.spec.build()
    spec = self.spec
    self._forward = jax.jit(lambda v, x, *rest: module.apply(v, spec.normalize(x), *rest))
    self.num_bytes = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(variables))

  def outputs(self, batch: dict) -> np.ndarray:
    args = (batch['inputs'], batch['mask']) if 'mask' in batch else (batch['inputs'],)
    return np.asarray(self._forward(self.variables, *args))

  def add_outputs(self, batch: dict) -> dict:
    """`batch` plus the teacher's outputs under 'teacher' (host arrays)."""
    return {**batch, TEACHER_KEY: self.outputs(batch)}
