"""Parameter and optimizer-state shard shapes for each sharding mode (8 fake CPUs)."""

import numpy as np
import pytest

from beam_dl.training import sharding
from beam_dl.training.config import DataConfig, ShardingConfig, TrainConfig
from beam_dl.training.strategies import MeshStrategy

CNN = dict(num_classes=10, features=[16, 32], hidden=64)

# Full shapes: Conv_0 (3,3,1,16), Conv_1 (3,3,16,32), Dense_0 (128,64), Dense_1 (64,10).
EXPECTED = {
  'dp': {'Conv_0': (3, 3, 1, 16), 'Conv_1': (3, 3, 16, 32), 'Dense_0': (128, 64), 'Dense_1': (64, 10)},
  # conv_out and mlp over 'data' (8); 10 classes do not divide by 8: replicated.
  'fsdp': {'Conv_0': (3, 3, 1, 2), 'Conv_1': (3, 3, 16, 4), 'Dense_0': (128, 8), 'Dense_1': (8, 10)},
  # data=4 x model=2: conv_out and mlp over 'model'.
  'tensor': {'Conv_0': (3, 3, 1, 8), 'Conv_1': (3, 3, 16, 16), 'Dense_0': (128, 32), 'Dense_1': (32, 10)},
  # both: conv_in / embed over 'data' where it divides, conv_out / mlp over 'model'.
  'fsdp_tensor': {'Conv_0': (3, 3, 1, 8), 'Conv_1': (3, 3, 4, 16), 'Dense_0': (32, 32), 'Dense_1': (32, 10)},
}


def _config(mode, **kwargs):
  return TrainConfig(
    model='small_cnn',
    model_kwargs=CNN,
    data=DataConfig(kind='images', shape=(8, 8, 1)),
    sharding=ShardingConfig(mode=mode, model_parallelism=2 if 'tensor' in mode else 1),
    **kwargs,
  )


def _kernel_shards(shapes, prefix):
  return {layer: shapes[f"{prefix}['{layer}']['kernel']"] for layer in EXPECTED['dp']}


@pytest.mark.parametrize('mode', sorted(EXPECTED))
def test_param_and_adam_state_shard_shapes(mode):
  strategy = MeshStrategy(_config(mode))
  shapes = strategy.shard_shapes()
  assert _kernel_shards(shapes, '.params') == EXPECTED[mode]
  # Adam's first and second moments are laid out exactly like the params.
  assert _kernel_shards(shapes, '.opt_state[0].mu') == EXPECTED[mode]
  assert _kernel_shards(shapes, '.opt_state[0].nu') == EXPECTED[mode]
  assert shapes['.step'] == ()
  # The created state really lives in that layout on the 8 devices.
  state = strategy.create_state()
  kernel = state.params['Dense_0']['kernel']
  assert {s.data.shape for s in kernel.addressable_shards} == {EXPECTED[mode]['Dense_0']}
  assert len(kernel.addressable_shards) == 8


def test_gradient_accumulation_buffers_follow_the_params():
  strategy = MeshStrategy(_config('fsdp', grad_accum_steps=4))
  shapes = strategy.shard_shapes()
  acc = {k: v for k, v in shapes.items() if 'acc_grads' in k and k.endswith("['Dense_0']['kernel']")}
  assert list(acc.values()) == [EXPECTED['fsdp']['Dense_0']]


def test_rules_in_config_override_the_mode_defaults():
  cfg = _config('fsdp')
  cfg.sharding.rules = (('batch', 'data'), ('vocab', 'data'))  # only the class axis
  shapes = MeshStrategy(cfg).shard_shapes()
  assert shapes[".params['Dense_0']['kernel']"] == (128, 64)
  assert shapes[".params['Dense_1']['kernel']"] == (64, 10)  # not divisible: replicated


def test_rnn_fsdp_shards_recurrent_kernels():
  cfg = TrainConfig(
    model='rnn',
    model_kwargs=dict(cell='gru', hidden_size=32, num_outputs=1, head='regression'),
    task='regression',
    data=DataConfig(kind='sequences', shape=(None, 3), max_len=5, target='target'),
    sharding=ShardingConfig(mode='fsdp'),
  )
  shapes = MeshStrategy(cfg).shard_shapes()
  assert shapes[".params['layer0_fwd']['scan']['cell']['hr']['kernel']"] == (32, 4)
  assert shapes[".params['layer0_fwd']['scan']['cell']['ir']['kernel']"] == (3, 4)


def test_mesh_shape_and_batch_sharding():
  mesh = sharding.make_mesh(ShardingConfig(mode='tensor', model_parallelism=2))
  assert dict(mesh.shape) == {'data': 4, 'model': 2}
  batch = sharding.shard_batch({'x': np.arange(16 * 3).reshape(16, 3)}, mesh)
  assert {s.data.shape for s in batch['x'].addressable_shards} == {(4, 3)}
  np.testing.assert_array_equal(np.asarray(batch['x']), np.arange(16 * 3).reshape(16, 3))
  with pytest.raises(ValueError, match='model_parallelism=3 needs a multiple of 3 devices, found 8'):
    sharding.make_mesh(ShardingConfig(model_parallelism=3))
