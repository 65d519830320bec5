"""JaxModelHandler on a model with hand-set weights: exact outputs, padding
stripped, compiles bounded by the bucket count."""
import numpy as np
import pytest

from beam_dl import checkpoints
from beam_dl.handler import JaxModelHandler, bucket_for, power_of_two_buckets

# y = (x / 255) W + b for 2x2x1 uint8 images, 3 outputs.
KERNEL = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, -1.0]], np.float32)
BIAS = np.array([0.5, -0.5, 0.0], np.float32)


@pytest.fixture(scope='module', params=['orbax', 'msgpack'])
def model_dir(request, tmp_path_factory):
  spec = checkpoints.ModelSpec(
      name='linear', kwargs={'num_outputs': 3}, input_shape=(2, 2, 1), input_dtype='uint8', input_scale=1 / 255
  )
  variables = {'params': {'Dense_0': {'kernel': KERNEL, 'bias': BIAS}}}
  path = str(tmp_path_factory.mktemp(request.param) / 'model')
  return checkpoints.save(path, spec, variables, fmt=request.param)


def expected(images):
  return np.stack([im.reshape(-1) / 255.0 for im in images]) @ KERNEL + BIAS


def images(n, seed=0):
  return list(np.random.default_rng(seed).integers(0, 256, size=(n, 2, 2, 1), dtype=np.uint8))


def test_outputs_match_hand_computation(model_dir):
  handler = JaxModelHandler(model_dir, max_batch_size=8)
  model = handler.load_model()
  batch = images(5)
  results = list(handler.run_inference(batch, model))
  assert len(results) == 5  # padded to bucket 8, padding stripped
  np.testing.assert_allclose(np.stack([r.inference for r in results]), expected(batch), rtol=1e-5, atol=1e-6)
  assert all(r.example is x for r, x in zip(results, batch))
  assert {r.model_id for r in results} == {model_dir}


def test_batches_larger_than_max_are_chunked_in_order(model_dir):
  handler = JaxModelHandler(model_dir, max_batch_size=4)
  model = handler.load_model()
  batch = images(11, seed=1)
  outputs = np.stack([r.inference for r in handler.run_inference(batch, model)])
  np.testing.assert_allclose(outputs, expected(batch), rtol=1e-5, atol=1e-6)


def test_compiles_bounded_by_buckets_when_batch_sizes_vary(model_dir):
  model = JaxModelHandler(model_dir, max_batch_size=16).load_model()
  sizes = [1, 2, 3, 5, 7, 9, 13, 16, 17, 31, 40, 4, 6, 1]
  first = [model.predict_counted(images(n, seed=n))[1] for n in sizes]
  again = [model.predict_counted(images(n, seed=n))[1] for n in sizes]
  assert sum(c.compiles for c in first) == len(power_of_two_buckets(16)) == 5
  assert sum(c.compiles for c in again) == 0
  # padding counted per call: 3 -> bucket 4, 17 -> 16 + 1, 40 -> 16 + 16 + 8
  by_size = dict(zip(sizes, again))
  assert (by_size[3].padded_slots, by_size[3].total_slots) == (1, 4)
  assert (by_size[17].padded_slots, by_size[17].total_slots) == (0, 17)
  assert (by_size[40].padded_slots, by_size[40].total_slots) == (0, 40)


def test_wrong_shape_raises_clear_error(model_dir):
  handler = JaxModelHandler(model_dir, max_batch_size=4)
  with pytest.raises(ValueError, match=r'shape \(3, 3, 1\).*\(2, 2, 1\)'):
    handler.run_inference([np.zeros((3, 3, 1), np.uint8)], handler.load_model())


def test_num_bytes_is_array_bytes_not_pickle(model_dir):
  assert JaxModelHandler(model_dir).get_num_bytes(images(3)) == 12


def test_bucket_helpers():
  assert power_of_two_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
  assert [bucket_for(n, (1, 4, 16)) for n in (1, 2, 4, 5, 16)] == [1, 4, 4, 16, 16]


def test_constructor_validates_early(model_dir):
  with pytest.raises(ValueError, match='precision'):
    JaxModelHandler(model_dir, precision='float16')
  with pytest.raises(ValueError, match='device'):
    JaxModelHandler(model_dir, device='npu')
  with pytest.raises(ValueError, match='max_batch_size'):
    JaxModelHandler(model_dir, max_batch_size=8, batch_buckets=(1, 4))
