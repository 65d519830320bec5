"""Teacher-student distillation (Hinton et al. 2015) for `pipelines.train`.

`Teacher` serves a trained model directory on the host: `add_outputs` puts
the teacher's outputs for a raw training batch under `batch['teacher']`
before the batch is sharded, so every sharding strategy (jit mesh, pmap)
sees it as one more batch field. `distillation_loss` mixes the student's
ordinary per-example loss with the soft loss:

  classification  'kl': T^2 * KL(softmax(teacher / T) || softmax(student / T))
                  (the cross-entropy's gradient, without the teacher's
                  entropy, so the soft loss reaches 0 when the student
                  matches the teacher); 'logits_mse': mean squared
                  difference of the logits (Ba & Caruana 2014)
  regression      MSE(student, teacher)

  loss = (1 - weight) * hard + weight * soft

With `mixup` > 0 the batch's inputs are replaced by blends of pairs of its
examples (lambda ~ Beta(mixup, mixup), per example) before the teacher sees
them: the student learns the teacher's function on inputs beyond the
training set ("function matching", Beyer et al. 2022, "Knowledge
distillation: A good teacher is patient and consistent"), which is what a
small training set leaves a student short of. Blends carry no label, so
mixup needs weight 1. Sequences are blended only with a partner of the same
mask. Batch k's blend depends only on (seed, k), so a resumed run sees the
same inputs as an uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

TEACHER_KEY = 'teacher'
SOFT_LOSSES = ('kl', 'logits_mse')


def soft_loss(student, teacher, *, task: str, temperature: float, kind: str = 'kl'):
  """Per-example loss of the student against the teacher's outputs."""
  if kind not in SOFT_LOSSES:
    raise ValueError(f'distill_loss must be one of {SOFT_LOSSES}, got {kind!r}')
  teacher = jax.lax.stop_gradient(teacher)
  if task == 'classification' and kind == 'kl':
    log_student = jax.nn.log_softmax(student / temperature, axis=-1)
    log_teacher = jax.nn.log_softmax(teacher / temperature, axis=-1)
    return optax.losses.kl_divergence_with_log_targets(log_student, log_teacher) * temperature**2
  return jnp.mean(optax.squared_error(student, teacher.reshape(student.shape)), axis=-1)


def distillation_loss(hard, student, teacher, *, task: str, temperature: float, weight: float, kind: str = 'kl'):
  """(1 - weight) * hard + weight * soft, per example."""
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f'distillation weight must be in [0, 1], got {weight}')
  soft = soft_loss(student, teacher, task=task, temperature=temperature, kind=kind)
  return soft if weight == 1.0 else (1.0 - weight) * hard + weight * soft


def mixup(batch: dict, alpha: float, rng: np.random.Generator) -> dict:
  """`batch` with its inputs blended pairwise: x_i' = l_i x_i + (1 - l_i) x_p(i),
  p a random permutation, l_i ~ Beta(alpha, alpha); a sequence keeps l_i = 1
  unless its partner has the same mask. Labels are left as they were (the
  teacher's outputs replace them)."""
  x = np.asarray(batch['inputs'], np.float32)
  n = len(x)
  partner = rng.permutation(n)
  lam = rng.beta(alpha, alpha, size=n).astype(np.float32)
  if 'mask' in batch:
    mask = np.asarray(batch['mask'])
    lam = np.where(np.all(mask == mask[partner], axis=1), lam, np.float32(1.0))
  lam = lam.reshape((n,) + (1,) * (x.ndim - 1))
  return {**batch, 'inputs': lam * x + (1.0 - lam) * x[partner]}


class Teacher:
  """A trained beam_dl model directory, run on raw batches for distillation."""

  def __init__(self, model_dir: str, *, mixup: float = 0.0, seed: int = 0, start: int = 0):
    from beam_dl.models import checkpoints

    if mixup < 0:
      raise ValueError(f'distill_mixup must be >= 0, got {mixup}')
    self.model_dir = model_dir
    self.mixup, self.seed, self._batches = mixup, seed, start
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
    """`batch` (mixed up, with `mixup`) plus the teacher's outputs for it
    under 'teacher' (host arrays)."""
    if self.mixup:
      batch = mixup(batch, self.mixup, np.random.default_rng([self.seed, self._batches]))
    self._batches += 1
    return {**batch, TEACHER_KEY: self.outputs(batch)}
