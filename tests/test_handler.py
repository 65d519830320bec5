"""JaxModelHandler without a pipeline: exact outputs, buckets, formats,
precision, devices, OOM, refresh.

Models are tiny Flax modules: a linear model with hand-set weights whose
outputs are computed by hand, and seeded models from tests.models whose
expected outputs come from `module.apply` directly.
"""

import os
import pickle

import jax
import numpy as np
import pytest

from beam_dl.models import checkpoints
from beam_dl.serving.handler import (
  JaxModelHandler,
  bucket_for,
  default_inference_fn,
  length_buckets_up_to,
  model_dir_for,
  power_of_two_buckets,
)
from beam_dl.serving.oom import call_with_oom_split, is_resource_exhausted
from tests.models import save_broken_model, save_seeded_model

CNN_SPEC = checkpoints.ModelSpec(
  name='small_cnn',
  kwargs={'num_classes': 10, 'features': [8, 16], 'hidden': 32},
  input_shape=(8, 8, 1),
  input_dtype='uint8',
  input_scale=1 / 255,
)
RNN_SPEC = checkpoints.ModelSpec(
  name='rnn',
  kwargs={'cell': 'gru', 'hidden_size': 16, 'num_outputs': 3, 'pooling': 'mean'},
  input_shape=(None, 4),
  input_dtype='float32',
  task='sequence_classification',
)
# y = (x / 255) W + b for 2x2x1 uint8 images, 3 outputs.
LINEAR_SPEC = checkpoints.ModelSpec(
  name='linear', kwargs={'num_outputs': 3}, input_shape=(2, 2, 1), input_dtype='uint8', input_scale=1 / 255
)
KERNEL = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, -1.0]], np.float32)
BIAS = np.array([0.5, -0.5, 0.0], np.float32)


@pytest.fixture(scope='module', params=['orbax', 'msgpack'])
def linear_dir(request, tmp_path_factory):
  """The hand-set linear model, saved in each format."""
  variables = {'params': {'Dense_0': {'kernel': KERNEL, 'bias': BIAS}}}
  path = str(tmp_path_factory.mktemp(request.param) / 'model')
  return checkpoints.save(path, LINEAR_SPEC, variables, fmt=request.param)


def by_hand(examples):
  return np.stack([im.reshape(-1) / 255.0 for im in examples]) @ KERNEL + BIAS


def images(n, seed=0, shape=(8, 8, 1)):
  return list(np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8))


def tiny_images(n, seed=0):
  """Inputs of the linear model."""
  return images(n, seed, shape=LINEAR_SPEC.input_shape)


def reference(spec, variables, examples):
  x = np.stack(examples)
  return np.asarray(spec.build().apply(variables, spec.normalize(x)))


def test_outputs_match_hand_computation(linear_dir):
  handler = JaxModelHandler(linear_dir, max_batch_size=8)
  model = handler.load_model()
  batch = tiny_images(5)
  results = list(handler.run_inference(batch, model))
  assert len(results) == 5  # padded to bucket 8, padding stripped
  np.testing.assert_allclose(np.stack([r.inference for r in results]), by_hand(batch), rtol=1e-5, atol=1e-6)
  assert all(r.example is x for r, x in zip(results, batch))
  assert {r.model_id for r in results} == {linear_dir}


def test_batches_larger_than_max_are_chunked_in_order(linear_dir):
  handler = JaxModelHandler(linear_dir, max_batch_size=4)
  model = handler.load_model()
  batch = tiny_images(11, seed=1)
  outputs = np.stack([r.inference for r in handler.run_inference(batch, model)])
  np.testing.assert_allclose(outputs, by_hand(batch), rtol=1e-5, atol=1e-6)


def test_compiles_bounded_by_buckets_when_batch_sizes_vary(linear_dir):
  model = JaxModelHandler(linear_dir, max_batch_size=16).load_model()
  sizes = [1, 2, 3, 5, 7, 9, 13, 16, 17, 31, 40, 4, 6, 1]
  first = [model.predict_counted(tiny_images(n, seed=n))[1] for n in sizes]
  again = [model.predict_counted(tiny_images(n, seed=n))[1] for n in sizes]
  assert sum(c.compiles for c in first) == len(power_of_two_buckets(16)) == 5
  assert sum(c.compiles for c in again) == 0
  # padding counted per call: 3 -> bucket 4, 17 -> 16 + 1, 40 -> 16 + 16 + 8
  by_size = dict(zip(sizes, again))
  assert (by_size[3].padded_slots, by_size[3].total_slots) == (1, 4)
  assert (by_size[17].padded_slots, by_size[17].total_slots) == (0, 17)
  assert (by_size[40].padded_slots, by_size[40].total_slots) == (0, 40)


def test_a_new_batch_size_runs_in_a_compiled_bucket_until_it_comes_back(linear_dir):
  """A bundle's short last batch pads into the compiled full bucket rather
  than compiling its own; a size that recurs gets its own bucket; a bucket
  more than twice as large is not used (1 row padded to 4 would cost more
  than it saves on a large model)."""
  model = JaxModelHandler(linear_dir, max_batch_size=16).load_model()
  sizes = [16, 8, 8, 3, 3, 3, 1]
  calls = [(n, tiny_images(n, seed=i)) for i, n in enumerate(sizes)]
  served = [model.predict_counted(images) for _, images in calls]
  assert [c.compiles for _, c in served] == [1, 0, 1, 0, 1, 0, 1]
  assert [(c.padded_slots, c.total_slots) for _, c in served] == [
    (0, 16),
    (8, 16),
    (0, 8),
    (5, 8),
    (1, 4),
    (1, 4),
    (0, 1),
  ]
  for (n, images), (outputs, _) in zip(calls, served):  # padding never shows in the outputs
    np.testing.assert_allclose(outputs, by_hand(images), rtol=1e-5, atol=1e-6)
    assert len(outputs) == n


def test_wrong_shape_raises_clear_error(linear_dir):
  handler = JaxModelHandler(linear_dir, max_batch_size=4)
  with pytest.raises(ValueError, match=r'shape \(3, 3, 1\).*\(2, 2, 1\)'):
    handler.run_inference([np.zeros((3, 3, 1), np.uint8)], handler.load_model())


def test_num_bytes_is_array_bytes_not_pickle(linear_dir):
  assert JaxModelHandler(linear_dir).get_num_bytes(tiny_images(3)) == 12


def test_bucket_helpers():
  assert power_of_two_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
  assert [bucket_for(n, (1, 4, 16)) for n in (1, 2, 4, 5, 16)] == [1, 4, 4, 16, 16]


@pytest.mark.parametrize('fmt', ['orbax', 'msgpack'])
def test_loads_orbax_and_msgpack_and_matches_apply(tmp_path, fmt):
  model_dir, variables = save_seeded_model(tmp_path / fmt, CNN_SPEC, fmt=fmt)
  handler = JaxModelHandler(model_dir, max_batch_size=8)
  model = handler.load_model()
  examples = images(11)
  results = handler.run_inference(examples, model)
  assert [r.model_id for r in results] == [model_dir] * 11
  np.testing.assert_allclose(
    np.stack([r.inference for r in results]), reference(CNN_SPEC, variables, examples), atol=1e-5
  )
  assert all(r.example is e for r, e in zip(results, examples))


def test_never_unpickles_a_model_file(tmp_path):
  """A directory holding only a pickle is refused, and the pickle never runs."""
  model_dir, _ = save_seeded_model(tmp_path / 'm', CNN_SPEC, fmt='msgpack')
  os.remove(os.path.join(model_dir, checkpoints.MSGPACK_FILE))
  marker = tmp_path / 'pwned'

  class Exploit:
    def __reduce__(self):
      return (open, (str(marker), 'w'))

  with open(os.path.join(model_dir, 'model.pkl'), 'wb') as f:
    pickle.dump(Exploit(), f)
  with pytest.raises(checkpoints.CheckpointError):
    JaxModelHandler(model_dir).load_model()
  assert not marker.exists()


def test_bfloat16_outputs_close_to_float32(tmp_path):
  model_dir, _ = save_seeded_model(tmp_path / 'm', CNN_SPEC)
  examples = images(16)
  f32 = JaxModelHandler(model_dir, max_batch_size=16)
  bf16 = JaxModelHandler(model_dir, max_batch_size=16, precision='bfloat16')
  out32 = np.stack([r.inference for r in f32.run_inference(examples, f32.load_model())])
  out16 = np.stack([r.inference for r in bf16.run_inference(examples, bf16.load_model())])
  assert out16.dtype == np.float32
  assert not np.array_equal(out16, out32)  # really computed in bf16
  np.testing.assert_allclose(out16, out32, atol=0.05 * np.abs(out32).max())


def test_data_parallel_over_eight_devices(tmp_path):
  assert jax.device_count() == 8
  model_dir, variables = save_seeded_model(tmp_path / 'm', CNN_SPEC)
  handler = JaxModelHandler(model_dir, max_batch_size=16, batch_buckets=[1, 4, 16], data_parallel=True)
  model = handler.load_model()
  assert model.batch_buckets == (8, 16)  # rounded up to multiples of the device count
  kernel = model.variables['params']['Dense_0']['kernel']
  assert kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 8
  examples = images(21)
  results = handler.run_inference(examples, model)
  np.testing.assert_allclose(
    np.stack([r.inference for r in results]), reference(CNN_SPEC, variables, examples), atol=1e-5
  )
  # the batch really is split: the compiled forward's input is sharded over 'data'
  batch = model.placement.put_batch(model._assemble(examples[:16])[0])[0]
  assert batch.sharding.spec[0] == 'data' and batch.addressable_shards[0].data.shape[0] == 2


def test_model_parallel_shards_wide_params(tmp_path):
  model_dir, variables = save_seeded_model(tmp_path / 'm', CNN_SPEC)
  handler = JaxModelHandler(model_dir, max_batch_size=8, model_parallelism=2)
  model = handler.load_model()
  kernel = model.variables['params']['Dense_0']['kernel']  # logical ('embed', 'mlp')
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'model')
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 2)
  examples = images(5)
  results = handler.run_inference(examples, model)
  np.testing.assert_allclose(
    np.stack([r.inference for r in results]), reference(CNN_SPEC, variables, examples), atol=1e-5
  )


def test_rnn_sequences_padded_to_length_buckets_with_bounded_compiles(tmp_path):
  model_dir, variables = save_seeded_model(tmp_path / 'rnn', RNN_SPEC, fmt='msgpack')
  handler = JaxModelHandler(model_dir, max_batch_size=4, length_buckets=(8, 16))
  model = handler.load_model()
  rng = np.random.default_rng(0)
  lengths = rng.choice([2, 5, 11, 16], size=16)
  sequences = [rng.normal(size=(length, 4)).astype(np.float32) for length in lengths]
  outputs, counts = [], []
  for start in range(0, len(sequences), 4):  # batches as BatchElements would hand them over
    out, used = model.predict_counted(sequences[start : start + 4])
    outputs += list(out)
    counts.append(used)
  apply = jax.jit(RNN_SPEC.build().apply)
  for seq, out in zip(sequences, outputs):  # same as the unpadded sequence alone
    alone = apply(variables, seq[None], np.ones((1, len(seq)), bool))
    np.testing.assert_allclose(out, np.asarray(alone)[0], atol=1e-5)
  assert sum(c.compiles for c in counts) <= 2  # two length buckets x one (full) batch bucket
  padded, total = sum(c.padded_slots for c in counts), sum(c.total_slots for c in counts)
  assert padded == total - sum(len(s) for s in sequences) > 0


def test_compile_ahead_compiles_every_shape_at_load_and_none_while_serving(tmp_path):
  """Streaming batches come in every size: with compile_ahead each (batch bucket x length bucket) compiles
  when the model loads, and batches of any size and length afterwards compile nothing."""
  model_dir, variables = save_seeded_model(tmp_path / 'rnn', RNN_SPEC, fmt='msgpack')
  lengths = length_buckets_up_to(12, (4, 8, 16, 32))  # what sequences of up to 12 steps pad to
  assert lengths == (4, 8, 16)
  handler = JaxModelHandler(model_dir, max_batch_size=8, length_buckets=lengths, compile_ahead=True)
  model = handler.load_model()
  assert model.shapes._compiled == {(rows, length) for rows in (1, 2, 4, 8) for length in lengths}
  rng = np.random.default_rng(1)
  apply = jax.jit(RNN_SPEC.build().apply)
  for size in (1, 3, 5, 8, 2, 7):
    sequences = [rng.normal(size=(rng.integers(1, 13), 4)).astype(np.float32) for _ in range(size)]
    out, used = model.predict_counted(sequences)
    assert used.compiles == 0
    for seq, row in zip(sequences, out):
      alone = apply(variables, seq[None], np.ones((1, len(seq)), bool))
      np.testing.assert_allclose(row, np.asarray(alone)[0], atol=1e-5)
  cold = JaxModelHandler(model_dir, max_batch_size=8, length_buckets=(8, 16)).load_model()
  assert cold.predict_counted([np.zeros((3, 4), np.float32)] * 3)[1].compiles == 1  # without it: compiles now


def resource_exhausted(n):
  return jax.errors.JaxRuntimeError(f'RESOURCE_EXHAUSTED: Out of memory while trying to allocate {n * 1 << 20} bytes.')


def test_oom_splits_batch_in_halves_down_to_one(tmp_path):
  model_dir, variables = save_seeded_model(tmp_path / 'm', CNN_SPEC)
  calls = []

  def fits_four(model, batch, inference_args):
    calls.append(len(batch))
    if len(batch) > 4:
      raise resource_exhausted(len(batch))
    return default_inference_fn(model, batch, inference_args)

  handler = JaxModelHandler(model_dir, max_batch_size=16, inference_fn=fits_four)
  examples = images(13)
  results = handler.run_inference(examples, handler.load_model())
  np.testing.assert_allclose(
    np.stack([r.inference for r in results]), reference(CNN_SPEC, variables, examples), atol=1e-5
  )
  assert calls == [13, 6, 3, 3, 7, 3, 4]


def test_oom_on_a_single_example_raises_and_other_errors_are_not_split():
  def always_oom(batch):
    raise resource_exhausted(len(batch))

  with pytest.raises(jax.errors.JaxRuntimeError, match='RESOURCE_EXHAUSTED'):
    call_with_oom_split(always_oom, [1, 2, 3])
  calls = []

  def broken(batch):
    calls.append(len(batch))
    raise ValueError('bad input')

  with pytest.raises(ValueError):
    call_with_oom_split(broken, [1, 2, 3])
  assert calls == [3]
  assert is_resource_exhausted(resource_exhausted(1)) and not is_resource_exhausted(ValueError('x'))


def test_refresh_to_broken_checkpoint_keeps_serving_last_good_model(tmp_path):
  good, _ = save_seeded_model(tmp_path / 'good', CNN_SPEC)
  other, other_vars = save_seeded_model(tmp_path / 'other', CNN_SPEC, seed=1, fmt='msgpack')
  broken = save_broken_model(tmp_path / 'broken', CNN_SPEC)
  handler = JaxModelHandler(good, max_batch_size=4)
  first = handler.load_model()
  handler.update_model_path(os.path.join(broken, checkpoints.MSGPACK_FILE))  # as WatchFilePattern reports it
  assert handler.model_dir == broken
  assert handler.load_model() is first
  # after pickling (a fresh worker) it reloads the last good directory instead
  restored = pickle.loads(pickle.dumps(handler))
  assert restored.load_model().model_id() == good
  handler.update_model_path(os.path.join(other, checkpoints.SPEC_FILE))
  refreshed = handler.load_model()
  examples = images(3)
  results = handler.run_inference(examples, refreshed)
  assert {r.model_id for r in results} == {other}
  np.testing.assert_allclose(
    np.stack([r.inference for r in results]), reference(CNN_SPEC, other_vars, examples), atol=1e-5
  )


def test_initial_load_failure_raises(tmp_path):
  with pytest.raises(checkpoints.CheckpointError):
    JaxModelHandler(str(tmp_path / 'missing')).load_model()


def test_model_dir_for_watched_paths():
  assert model_dir_for('gs://b/models/v2/spec.json') == 'gs://b/models/v2'
  assert model_dir_for('/m/v2/variables.msgpack') == '/m/v2'
  assert model_dir_for('/m/v2/variables/_CHECKPOINT_METADATA') == '/m/v2'
  assert model_dir_for('/m/v2/') == '/m/v2'


def test_env_var_defaults_do_not_override_the_environment(monkeypatch):
  monkeypatch.delenv('XLA_PYTHON_CLIENT_PREALLOCATE', raising=False)
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')
  monkeypatch.delenv('BEAM_DL_TEST_FLAG', raising=False)
  handler = JaxModelHandler('unused', memory_fraction=0.2, env_vars={'BEAM_DL_TEST_FLAG': '1'})
  handler.set_environment_vars()
  assert os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] == 'false'
  assert os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.5'  # the environment wins over defaults
  assert os.environ['BEAM_DL_TEST_FLAG'] == '1'  # explicit env_vars always apply


def test_constructor_validates_arguments():
  with pytest.raises(ValueError, match='precision'):
    JaxModelHandler('m', precision='float16')
  with pytest.raises(ValueError, match='device'):
    JaxModelHandler('m', device='npu')
  with pytest.raises(ValueError, match='max_batch_size'):
    JaxModelHandler('m', max_batch_size=8, batch_buckets=(1, 4))
  with pytest.raises(ValueError, match='max_batch_weight'):
    JaxModelHandler('m', max_batch_weight=10, element_size_fn=len)
  with pytest.raises(ValueError, match='model_parallelism'):
    JaxModelHandler('m', model_parallelism=0)
  with pytest.raises(ValueError, match='inference_args'):
    JaxModelHandler('m').validate_inference_args({'temperature': 2.0})
  handler = JaxModelHandler(
    'm',
    max_batch_size=32,
    min_batch_size=4,
    max_batch_duration_secs=5,
    batch_length_fn=len,
    batch_bucket_boundaries=[16, 64],
  )
  assert handler.batch_elements_kwargs() == {
    'min_batch_size': 4,
    'max_batch_size': 32,
    'max_batch_duration_secs': 5,
    'length_fn': len,
    'bucket_boundaries': [16, 64],
  }
