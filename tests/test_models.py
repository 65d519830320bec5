"""ResNet and RNN models: shapes, dtypes, batch norm, remat, masking contract."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beam_dl import models


def _params(variables):
  return nn.meta.unbox(variables)['params']


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# --- ResNet -----------------------------------------------------------------


@pytest.mark.parametrize('name,expected', [('resnet18', 11_689_512), ('resnet50', 25_557_032)])
def test_resnet_parameter_counts_match_the_reference_architectures(name, expected):
  # The torchvision / Keras reference counts for 1000 classes.
  model = models.build(name, num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert _count(_params(shapes)) == expected
  assert 'batch_stats' in shapes


def test_resnet_bfloat16_compute_keeps_float32_params_and_logits():
  model = models.build('resnet_tiny', num_classes=10, dtype='bfloat16')
  x = jnp.zeros((4, 8, 8, 1))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(_params(variables)))
  logits = jax.eval_shape(model.apply, variables, x)
  assert logits.dtype == jnp.float32 and logits.shape == (4, 10)


def test_resnet_tiny_batch_stats_and_remat():
  """Training updates batch stats; remat gives the same gradients; eval uses running stats."""
  x = np.random.default_rng(1).random((4, 8, 8, 1), np.float32)
  plain = models.build('resnet_tiny', num_classes=10)
  remat = models.build('resnet_tiny', num_classes=10, remat=True)
  variables = plain.init(jax.random.key(0), x)

  def grads(model):
    def loss(p):
      out, updates = model.apply({**variables, 'params': p}, x, train=True, mutable=['batch_stats'])
      return jnp.sum(out**2), updates['batch_stats']

    return jax.jit(jax.grad(loss, has_aux=True))(variables['params'])

  plain_grads, stats = grads(plain)
  remat_grads, remat_stats = grads(remat)
  for a, b in zip(jax.tree_util.tree_leaves(plain_grads), jax.tree_util.tree_leaves(remat_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  before = jax.tree_util.tree_leaves(variables['batch_stats'])
  after = jax.tree_util.tree_leaves(stats)
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(remat_stats)
  # Inference uses the running statistics: no mutable collections needed.
  assert jax.jit(plain.apply)(variables, x).shape == (4, 10)


def test_resnet_params_carry_logical_axis_names():
  model = models.build('resnet_tiny', num_classes=10)
  specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
  assert tuple(specs['params']['conv_init']['kernel']) == ('conv_height', 'conv_width', 'conv_in', 'conv_out')
  assert tuple(specs['params']['head']['kernel']) == ('mlp', 'vocab')


# --- RNN --------------------------------------------------------------------


def _sequences(seed=0, batch=3, steps=6, features=2):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, steps, features)).astype(np.float32)
  lengths = np.array([steps, 3, 1])[:batch]
  mask = np.arange(steps)[None, :] < lengths[:, None]
  return x, mask


@pytest.mark.parametrize(
  'cell,bidirectional,pooling,layers',
  [
    ('lstm', False, 'last', 1),
    ('gru', True, 'last', 2),
    ('lstm', True, 'mean', 1),
    ('gru', False, 'attention', 1),
  ],
)
def test_rnn_padded_steps_never_change_the_output(cell, bidirectional, pooling, layers):
  model = models.build(
    'rnn', cell=cell, hidden_size=8, num_layers=layers, bidirectional=bidirectional, pooling=pooling, num_outputs=3
  )
  x, mask = _sequences()
  variables = model.init(jax.random.key(0), x, mask)
  apply = jax.jit(model.apply)
  out = apply(variables, x, mask)
  assert out.shape == (3, 3) and out.dtype == jnp.float32
  # Garbage in the padded steps, and a longer length bucket, change nothing.
  noisy = np.where(mask[..., None], x, 1e3).astype(np.float32)
  longer = np.concatenate([noisy, np.full((3, 4, 2), -7.0, np.float32)], axis=1)
  longer_mask = np.concatenate([mask, np.zeros((3, 4), bool)], axis=1)
  np.testing.assert_allclose(apply(variables, longer, longer_mask), out, rtol=1e-5, atol=1e-6)
  # ...while a real step does change it.
  changed = x.copy()
  changed[1, 0] += 1.0
  assert not np.allclose(apply(variables, changed, mask)[1], out[1])


def test_rnn_last_pooling_equals_running_only_the_valid_prefix():
  model = models.build('rnn', cell='lstm', hidden_size=8, bidirectional=True, num_outputs=2)
  x, mask = _sequences()
  variables = model.init(jax.random.key(0), x, mask)
  out = model.apply(variables, x, mask)
  short = model.apply(variables, x[1:2, :3], np.ones((1, 3), bool))
  np.testing.assert_allclose(out[1:2], short, rtol=1e-5, atol=1e-6)


def test_rnn_next_item_head_embeds_item_ids_from_feature_zero():
  model = models.build(
    'rnn',
    cell='gru',
    hidden_size=8,
    head='next_item',
    vocab_size=20,
    num_outputs=20,
    pooling='attention',
    dtype='bfloat16',
  )
  ids = np.array([[3, 5, 7, 0], [1, 2, 0, 0]], np.float32)[..., None]
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  variables = model.init(jax.random.key(0), ids, mask)
  logits = model.apply(variables, ids, mask)
  assert logits.shape == (2, 20) and logits.dtype == jnp.float32
  assert _params(variables)['item_embed']['embedding'].shape == (20, 32)
  assert _params(variables)['item_embed']['embedding'].dtype == jnp.float32
  other = ids.copy()
  other[0, 1, 0] = 6
  assert not np.allclose(model.apply(variables, other, mask)[0], logits[0])


def test_rnn_dropout_only_in_training():
  model = models.build('rnn', hidden_size=8, num_layers=2, dropout_rate=0.5, num_outputs=2)
  x, mask = _sequences()
  variables = jax.jit(model.init)(jax.random.key(0), x, mask)
  train = jax.jit(lambda rng: model.apply(variables, x, mask, train=True, rngs={'dropout': rng}))
  assert not np.allclose(train(jax.random.key(1)), train(jax.random.key(2)))
  infer = jax.jit(model.apply)
  np.testing.assert_array_equal(infer(variables, x, mask), infer(variables, x, mask))


@pytest.mark.parametrize(
  'kwargs,message',
  [
    ({'cell': 'rnn'}, 'cell'),
    ({'pooling': 'max'}, 'pooling'),
    ({'head': 'ranking'}, 'head'),
    ({'head': 'next_item'}, 'vocab_size'),
  ],
)
def test_rnn_rejects_bad_arguments(kwargs, message):
  x, mask = _sequences()
  with pytest.raises(ValueError, match=message):
    models.build('rnn', **kwargs).init(jax.random.key(0), x, mask)


def test_model_names_are_registered():
  assert {'rnn', 'resnet', 'resnet18', 'resnet50', 'resnet_tiny', 'small_cnn'} <= set(models.names())
