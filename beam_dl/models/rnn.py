"""Recurrent sequence models: stacked, optionally bidirectional LSTM/GRU.

One module, `RNNModel` (registered as 'rnn'), covers three tasks through its
head: sequence classification, next-item prediction (session-based
recommendation over item ids) and forecasting (regression).

Contract (the serving handler and the streaming pipeline rely on it):
`model.apply(variables, x, mask)` with x [B, T, F] float and mask [B, T] bool
returns [B, num_outputs] float32, and steps where mask is False never change
the output: the recurrent state is carried unchanged through them, their
outputs are zeroed and pooling ignores them. Padding may sit anywhere (right
padding to a length bucket is the usual case), and a longer bucket gives the
same answer as a shorter one.

Parameters carry logical axis names (`nn.with_logical_partitioning`); the
mesh and the rules that map logical axes to mesh axes live in the training
config, never here.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from beam_dl.models import registry

_CELLS = {'lstm': nn.OptimizedLSTMCell, 'gru': nn.GRUCell}
_POOLINGS = ('last', 'mean', 'attention')
_HEADS = ('classification', 'regression', 'next_item')


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, axes)


class _MaskedStep(nn.Module):
  """One time step of `cell`; where mask is False the carry passes through."""

  cell: str
  hidden_size: int
  dtype: Any

  @nn.compact
  def __call__(self, carry, inputs):
    x, m = inputs
    cell = _CELLS[self.cell](
      self.hidden_size,
      dtype=self.dtype,
      kernel_init=_partitioned(nn.initializers.lecun_normal(), ('rnn_in', 'rnn_hidden')),
      recurrent_kernel_init=_partitioned(nn.initializers.orthogonal(), ('rnn_state', 'rnn_hidden')),
      bias_init=_partitioned(nn.initializers.zeros, ('rnn_hidden',)),
      name='cell',
    )
    new_carry, y = cell(carry, x)
    keep = m[:, None]
    new_carry = jax.tree_util.tree_map(lambda new, old: jnp.where(keep, new, old), new_carry, carry)
    return new_carry, jnp.where(keep, y, jnp.zeros_like(y))


class _MaskedRNN(nn.Module):
  """Scans `_MaskedStep` over time (axis 1); returns (outputs, last hidden)."""

  cell: str
  hidden_size: int
  dtype: Any
  reverse: bool = False

  @nn.compact
  def __call__(self, x, mask):
    batch = x.shape[0]
    zeros = jnp.zeros((batch, self.hidden_size), self.dtype)
    carry = (zeros, zeros) if self.cell == 'lstm' else zeros
    scan = nn.scan(
      _MaskedStep,
      variable_broadcast='params',
      split_rngs={'params': False},
      in_axes=1,
      out_axes=1,
      reverse=self.reverse,
    )
    carry, ys = scan(self.cell, self.hidden_size, self.dtype, name='scan')(carry, (x, mask))
    last = carry[1] if self.cell == 'lstm' else carry  # LSTM carry is (c, h)
    return ys, last


@registry.register('rnn')
class RNNModel(nn.Module):
  """Stacked (bi)directional LSTM/GRU with masked pooling and a task head.

  Attributes:
    cell: 'lstm' or 'gru'.
    hidden_size: units per direction per layer.
    num_layers: stacked recurrent layers.
    bidirectional: run a backward layer too and concatenate both directions.
    pooling: 'last' (final state of each direction), 'mean' (masked mean of
      the top layer's outputs) or 'attention' (learned masked softmax weights).
    num_outputs: classes, regression targets (forecast horizon) or items.
    head: 'classification' (logits), 'regression' (values) or 'next_item'
      (logits over `num_outputs` item ids).
    vocab_size: when set, feature 0 of x holds an integer item id (as float)
      that is embedded into `embed_size` dims and joined with features 1:.
    embed_size: item embedding width (only with `vocab_size`).
    dropout_rate: dropout between layers and before the head, train only.
    dtype: compute dtype ('float32' or 'bfloat16'); params stay float32.
  """

  cell: str = 'lstm'
  hidden_size: int = 64
  num_layers: int = 1
  bidirectional: bool = False
  pooling: str = 'last'
  num_outputs: int = 1
  head: str = 'classification'
  vocab_size: int | None = None
  embed_size: int = 32
  dropout_rate: float = 0.0
  dtype: Any = 'float32'

  def _check(self):
    if self.cell not in _CELLS:
      raise ValueError(f'cell must be one of {sorted(_CELLS)}, got {self.cell!r}')
    if self.pooling not in _POOLINGS:
      raise ValueError(f'pooling must be one of {_POOLINGS}, got {self.pooling!r}')
    if self.head not in _HEADS:
      raise ValueError(f'head must be one of {_HEADS}, got {self.head!r}')
    if self.head == 'next_item' and not self.vocab_size:
      raise ValueError("head='next_item' needs vocab_size (item ids in feature 0)")

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False):
    self._check()
    dtype = jnp.dtype(self.dtype)
    if mask is None:
      mask = jnp.ones(x.shape[:2], bool)
    mask = mask.astype(bool)
    x = jnp.asarray(x, jnp.float32)
    if self.vocab_size:
      ids = jnp.clip(x[..., 0].astype(jnp.int32), 0, self.vocab_size - 1)
      emb = nn.Embed(
        self.vocab_size,
        self.embed_size,
        dtype=dtype,
        embedding_init=_partitioned(nn.initializers.normal(stddev=1.0), ('vocab', 'embed')),
        name='item_embed',
      )(ids)
      x = jnp.concatenate([emb, x[..., 1:].astype(dtype)], axis=-1)
    h = x.astype(dtype)
    lasts = []
    for layer in range(self.num_layers):
      fwd, fwd_last = _MaskedRNN(self.cell, self.hidden_size, dtype, name=f'layer{layer}_fwd')(h, mask)
      outs, lasts = [fwd], [fwd_last]
      if self.bidirectional:
        bwd, bwd_last = _MaskedRNN(
          self.cell,
          self.hidden_size,
          dtype,
          reverse=True,
          name=f'layer{layer}_bwd',
        )(h, mask)
        outs.append(bwd)
        lasts.append(bwd_last)
      h = jnp.concatenate(outs, axis=-1)
      if self.dropout_rate and layer < self.num_layers - 1:
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    pooled = self._pool(h, lasts, mask, dtype)
    if self.dropout_rate:
      pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
    out = nn.Dense(
      self.num_outputs,
      dtype=dtype,
      kernel_init=_partitioned(nn.initializers.lecun_normal(), ('mlp', 'vocab')),
      bias_init=_partitioned(nn.initializers.zeros, ('vocab',)),
      name='head',
    )(pooled)
    return out.astype(jnp.float32)

  def _pool(self, h, lasts, mask, dtype):
    if self.pooling == 'last':
      return jnp.concatenate(lasts, axis=-1)
    m = mask[..., None].astype(dtype)
    if self.pooling == 'mean':
      count = jnp.maximum(m.sum(axis=1), 1)
      return (h * m).sum(axis=1) / count
    scores = nn.Dense(
      1,
      dtype=dtype,
      kernel_init=_partitioned(nn.initializers.lecun_normal(), ('mlp', None)),
      use_bias=False,
      name='attention',
    )(nn.tanh(h))[..., 0].astype(jnp.float32)
    scores = jnp.where(mask, scores, -1e9)
    weights = jax.nn.softmax(scores, axis=1).astype(dtype)
    return jnp.einsum('bt,btd->bd', weights, h)


# Named variants (functools.partial aliases, as in the Flax examples).
LSTMClassifier = functools.partial(RNNModel, cell='lstm', head='classification')
GRUForecaster = functools.partial(RNNModel, cell='gru', head='regression', pooling='last')
SessionRecommender = functools.partial(RNNModel, cell='gru', head='next_item', pooling='attention')
TinyRNN = functools.partial(RNNModel, hidden_size=8, num_layers=1)  # tests only
