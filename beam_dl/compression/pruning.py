"""Magnitude pruning during training, as an optax transformation.

Gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune"): the target
sparsity rises from 0 at `start_step` to `sparsity` at `end_step` along
`optax.polynomial_schedule(power=3)` (which is their cubic schedule), and
every `every` updates each kernel (params with ndim >= 2: conv, dense,
recurrent kernels, embeddings) keeps only its largest-magnitude weights.
qwix's `get_sparsity_mask_unstructured` computes the mask (a percentile
threshold, a superset of the previous mask so pruned weights stay pruned);
the transformation rewrites the update so that pruned weights become and
stay exactly zero. Biases and batch-norm parameters are never pruned, nor
are kernels whose path ('stage1_block1/Conv_0/kernel') matches one of
`exclude`'s regular expressions: keeping the first convolution and the
classifier head dense is the usual choice at high sparsity (they hold few
weights and every input or output passes through them).

jaxpruner would be the field library for this, but PyPI does not serve it
here; chaining `magnitude_pruning` after any optax optimizer gives the same
behaviour as its `MagnitudePruning` updater with a polynomial schedule.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


class PruningState(NamedTuple):
  count: jax.Array
  masks: Any  # bool like each prunable leaf; a scalar True for the others


def _path(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def prunable(path, x, exclude: Sequence[str] = ()) -> bool:
  """True for a kernel (ndim >= 2) whose '/'-joined path no `exclude` regex matches."""
  return jnp.ndim(x) >= 2 and not any(re.search(e, _path(path)) for e in exclude)


def sparsity_schedule(sparsity: float, start_step: int, end_step: int) -> optax.Schedule:
  """0 until start_step, cubic ramp to `sparsity` at end_step, then constant."""
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f'sparsity must be in [0, 1), got {sparsity}')
  if end_step <= start_step:
    raise ValueError(f'end_step {end_step} must be after start_step {start_step}')
  return optax.polynomial_schedule(
    init_value=0.0,
    end_value=sparsity,
    power=3,
    transition_steps=end_step - start_step,
    transition_begin=start_step,
  )


def magnitude_pruning(
  sparsity: float, start_step: int, end_step: int, every: int = 10, exclude: Sequence[str] = ()
) -> optax.GradientTransformation:
  """Chain after the optimizer: params + updates are pruned to the schedule's
  sparsity every `every` updates from start_step; pruned weights stay zero.
  Kernels whose path matches an `exclude` regex stay dense."""
  from qwix._src.core.sparsity import get_sparsity_mask_unstructured

  schedule = sparsity_schedule(sparsity, start_step, end_step)
  every = max(int(every), 1)

  def init(params):
    # Scalars (not None) for unpruned leaves keep the state tree shaped like
    # params, which the sharded strategies map their shardings over.
    masks = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.ones(jnp.shape(p) if prunable(path, p, exclude) else (), bool), params
    )
    return PruningState(count=jnp.zeros([], jnp.int32), masks=masks)

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('magnitude_pruning needs params: chain it with an optimizer given params')
    count = state.count
    due = (count >= start_step) & ((count - start_step) % every == 0) | (count == end_step)
    rate = 100.0 * schedule(count)

    def new_mask(u, p, m):
      if m.ndim == 0:
        return m
      return jax.lax.cond(
        due & (rate > 0),
        lambda: get_sparsity_mask_unstructured(p + u, m, rate) & m,
        lambda: m,
      )

    masks = jax.tree_util.tree_map(new_mask, updates, params, state.masks)
    updates = jax.tree_util.tree_map(lambda u, p, m: jnp.where(m, u, -p), updates, params, masks)
    return updates, PruningState(count=count + 1, masks=masks)

  return optax.GradientTransformation(init, update)


def sparsity_report(params: Any, exclude: Sequence[str] = ()) -> dict:
  """{'sparsity': zeros / weights over all kernels (the excluded ones too),
  'layers': {path: sparsity} of the pruned kernels, 'dense': paths of the
  excluded ones, 'pruned_weights', 'prunable_weights'}."""
  layers, dense, zeros, total = {}, [], 0, 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = np.asarray(leaf)
    if leaf.ndim < 2:
      continue
    z = int(np.sum(leaf == 0))
    if prunable(path, leaf, exclude):
      layers[_path(path)] = round(z / leaf.size, 4)
    else:
      dense.append(_path(path))
    zeros += z
    total += leaf.size
  return {
    'sparsity': round(zeros / max(total, 1), 4),
    'pruned_weights': zeros,
    'prunable_weights': total,
    'layers': layers,
    'dense': dense,
  }
