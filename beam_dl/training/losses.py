"""Per-example losses and metric sums (optax does the maths).

Every function returns per-example values; the train step averages them
with the batch's `weight` (0 for padding), so padded eval batches and
uneven last batches never bias a metric.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def classification_loss(logits, labels, *, num_classes: int, label_smoothing: float = 0.0, focal_gamma: float = 0.0):
  """Softmax cross-entropy, optionally label-smoothed, or focal loss.

  Focal loss (Lin et al. 2017) down-weights easy examples by (1 - p_t)^gamma,
  which helps long-tailed classes; `optax.sigmoid_focal_loss` is the binary
  form, so the multi-class form is written on top of optax's cross-entropy.
  """
  onehot = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    onehot = optax.smooth_labels(onehot, label_smoothing)
  ce = optax.softmax_cross_entropy(logits, onehot)
  if focal_gamma:
    p_t = jnp.exp(-optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    ce = ((1.0 - p_t) ** focal_gamma) * ce
  return ce


def regression_loss(preds, targets):
  """Mean squared error per example (over the target width)."""
  targets = targets.reshape(preds.shape)
  return jnp.mean(optax.squared_error(preds, targets), axis=-1)


def metric_sums(outputs, batch, task: str, loss):
  """Weighted sums {name: sum, 'count': weight sum} for one (sub-)batch."""
  w = batch['weight']
  sums = {'loss': jnp.sum(loss * w), 'count': jnp.sum(w)}
  if task == 'classification':
    correct = jnp.argmax(outputs, -1) == batch['label']
    sums['accuracy'] = jnp.sum(correct * w)
  else:
    target = batch['target'].reshape(outputs.shape)
    sums['mse'] = jnp.sum(jnp.mean((outputs - target) ** 2, -1) * w)
    sums['target_sq'] = jnp.sum(jnp.mean(target**2, -1) * w)
  return sums


def finalize(sums: dict) -> dict:
  """Sums -> means; regression also gets r2 against predicting zero change."""
  count = max(float(sums['count']), 1.0)
  out = {k: float(v) / count for k, v in sums.items() if k not in ('count', 'target_sq')}
  if 'target_sq' in sums and float(sums['target_sq']) > 0:
    out['skill_vs_zero'] = 1.0 - float(sums['mse']) / float(sums['target_sq'])
  out['examples'] = int(float(sums['count']))
  return out
