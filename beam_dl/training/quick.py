"""`fit_arrays`: train a registered model on in-memory arrays, single device.

The flagship demo and the streaming demo use it to get a real model in
seconds on a CPU. Sharded, checkpointed, resumable training from TFRecords is
`beam_dl.training` proper (`pipelines.train`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from beam_dl.models.checkpoints import ModelSpec
from beam_dl.operations.progress import Progress

LOSSES = {
  'softmax_cross_entropy': lambda out, y: optax.softmax_cross_entropy_with_integer_labels(out, y),
  'mse': lambda out, y: jnp.mean(jnp.square(out - y.reshape(out.shape)), axis=-1),
}


def fit_arrays(
  spec: ModelSpec,
  inputs: Sequence[np.ndarray],
  targets: np.ndarray,
  *,
  loss: str = 'softmax_cross_entropy',
  steps: int = 500,
  batch_size: int = 64,
  learning_rate: float = 1e-3,
  seed: int = 0,
) -> tuple[Any, list[float]]:
  """Trains `spec.build()` with Adam; returns (variables, per-step losses).

  Args:
    spec: the model and its input scaling; `inputs[0]` goes through
      `spec.normalize` exactly as the serving handler does.
    inputs: arrays with a leading example axis: (x,) or (x, mask) for
      sequence models.
    targets: int class ids (softmax_cross_entropy) or float targets (mse).
  """
  module = spec.build()
  n = len(targets)
  rng = np.random.default_rng(seed)
  first = tuple(a[:1] for a in inputs)
  variables = nn.meta.unbox(module.init(jax.random.key(seed), spec.normalize(jnp.asarray(first[0])), *first[1:]))
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(variables)
  loss_fn = LOSSES[loss]

  @jax.jit
  def step(variables, opt_state, batch, y):
    def objective(v):
      out = module.apply(v, spec.normalize(batch[0]), *batch[1:])
      return loss_fn(out, y).mean()

    value, grads = jax.value_and_grad(objective)(variables)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, value

  progress = Progress(steps, name='fit_arrays')
  losses = []
  for _ in range(steps):
    idx = rng.integers(0, n, size=min(batch_size, n))
    variables, opt_state, value = step(variables, opt_state, tuple(a[idx] for a in inputs), targets[idx])
    losses.append(float(value))
    progress.update(loss=losses[-1])
  return variables, losses
