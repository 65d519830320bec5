"""Training input pipeline (tf.data over the shared TFRecord formats), losses, CLI config."""

import numpy as np
import optax
import pytest

from beam_dl.decoding.sequences import SequenceRecord
from beam_dl.formats.sequence_example import encode_sequence_example
from beam_dl.training import datasets, input_pipeline, losses
from beam_dl.training.config import DataConfig, TrainConfig
from pipelines import train as train_cli

IMAGES = DataConfig(kind='images', shape=(8, 8, 1), shuffle_buffer=64)


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  return datasets.write_digits(str(tmp_path_factory.mktemp('digits')))


def _batches(ds, n):
  return list(ds.take(n).as_numpy_iterator())


def test_image_examples_decode_to_the_original_pixels(digits):
  from sklearn.datasets import load_digits

  ds = input_pipeline.make_dataset(IMAGES, digits[1], 359, train=False)
  (batch,) = list(ds.as_numpy_iterator())
  assert batch['inputs'].dtype == np.uint8 and batch['inputs'].shape == (359, 8, 8, 1)
  ref = load_digits()
  # Every decoded eval image is a digits image with its label.
  index = {ref.images[i].astype(np.uint8).tobytes(): ref.target[i] for i in range(len(ref.target))}
  assert all(index[img[..., 0].tobytes()] == y for img, y in zip(batch['inputs'], batch['label']))
  assert batch['weight'].tolist() == [1.0] * 359


def test_training_batches_are_a_function_of_seed_and_step(digits):
  make = lambda **kw: input_pipeline.make_dataset(IMAGES, digits[0], 16, train=True, **kw)
  first = _batches(make(seed=3), 6)
  resumed = _batches(make(seed=3, skip_batches=4), 2)
  for a, b in zip(first[4:], resumed):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
  other_seed = _batches(make(seed=4), 1)
  assert not np.array_equal(first[0]['label'], other_seed[0]['label'])
  # Repeats past one epoch (1,438 examples) with full batches only.
  assert all(len(b['label']) == 16 for b in _batches(make(seed=3), 100))


def test_each_process_reads_its_own_files(digits):
  def images(pi, pc):
    ds = input_pipeline.make_dataset(IMAGES, digits[1], 400, train=False, process_index=pi, process_count=pc)
    return sorted(x.tobytes() for b in ds.as_numpy_iterator() for x in b['inputs'])

  first, second = images(0, 2), images(1, 2)
  assert 0 < len(first) < 359 and len(first) + len(second) == 359
  # Together the two processes read every example exactly once.
  assert sorted(first + second) == images(0, 1)
  with pytest.raises(ValueError, match='one shard per process'):
    input_pipeline.make_dataset(IMAGES, digits[1], 8, train=False, process_index=0, process_count=5)
  with pytest.raises(FileNotFoundError):
    input_pipeline.make_dataset(IMAGES, digits[1] + '.missing', 8, train=False)


def test_batch_split_slices_the_one_process_batches(digits):
  """process_split='batch': process i's batch k is rows [i*b, (i+1)*b) of the 1-process batch k."""
  cfg = DataConfig(kind='images', shape=(8, 8, 1), shuffle_buffer=64, process_split='batch')

  def batches(pi, pc, n=3, skip=0):
    ds = input_pipeline.make_dataset(
      cfg, digits[0], 32 // pc, train=True, seed=5, skip_batches=skip, process_index=pi, process_count=pc
    )
    return _batches(ds, n)

  whole = batches(0, 1, n=4)
  parts = [batches(0, 2), batches(1, 2)]
  for k in range(3):
    for key in ('inputs', 'label'):
      np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])
  np.testing.assert_array_equal(batches(1, 2, n=1, skip=3)[0]['inputs'], whole[3]['inputs'][16:])
  with pytest.raises(ValueError, match='process_split'):
    input_pipeline.make_dataset(DataConfig(process_split='hosts'), digits[0], 8, train=True)


def test_sequences_keep_recent_steps_pad_mask_and_put_ids_first(tmp_path):
  records = [
    encode_sequence_example(
      SequenceRecord('a', np.arange(10, dtype=np.float32).reshape(5, 2), np.arange(4, 9), label=1)
    ),
    encode_sequence_example(SequenceRecord('b', np.ones((2, 2), np.float32), np.array([9, 3]), label=0)),
  ]
  pattern = datasets.write_shards(records, str(tmp_path / 'seq'), 1)
  cfg = DataConfig(kind='sequences', shape=(None, 3), max_len=4, target='label')
  (batch,) = list(input_pipeline.make_dataset(cfg, pattern, 2, train=False, use_ids=True).as_numpy_iterator())
  assert batch['inputs'].shape == (2, 4, 3)
  np.testing.assert_array_equal(batch['inputs'][0, :, 0], [5, 6, 7, 8])  # last 4 steps, ids first
  np.testing.assert_array_equal(batch['inputs'][0, :, 1:], np.arange(2, 10).reshape(4, 2))
  np.testing.assert_array_equal(batch['mask'], [[1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(batch['inputs'][1, 2:], 0)
  np.testing.assert_array_equal(batch['label'], [1, 0])


def test_pad_batch_adds_zero_weight_examples():
  batch = {'inputs': np.ones((3, 2)), 'weight': np.ones(3, np.float32), 'label': np.arange(3)}
  padded = input_pipeline.pad_batch(batch, 8)
  assert padded['inputs'].shape == (8, 2) and padded['weight'].tolist() == [1] * 3 + [0] * 5


def test_focal_loss_and_label_smoothing():
  logits = np.array([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0]], np.float32)
  labels = np.array([0, 0])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(losses.classification_loss(logits, labels, num_classes=3), ce, rtol=1e-5)
  focal = losses.classification_loss(logits, labels, num_classes=3, focal_gamma=2.0)
  # The confident example is down-weighted far more than the uncertain one.
  assert focal[0] / ce[0] < 0.01 and focal[1] / ce[1] > 0.4
  smooth = losses.classification_loss(logits, labels, num_classes=3, label_smoothing=0.3)
  targets = np.array([[0.8, 0.1, 0.1]] * 2)
  np.testing.assert_allclose(smooth, optax.softmax_cross_entropy(logits, targets), rtol=1e-5)


def test_cli_config_files_variants_and_overrides():
  module = train_cli.load_config_module('pipelines/configs/digits_cnn.py')
  base = module.get_config(None)
  assert isinstance(base, TrainConfig) and module.get_config('runlocal').num_steps < base.num_steps
  assert module.get_config('tensor').sharding.model_parallelism == 2
  changed = train_cli.apply_override(base, 'sharding.mode=fsdp')
  changed = train_cli.apply_override(changed, 'model_kwargs.hidden=16')
  changed = train_cli.apply_override(changed, 'learning_rate=0.5')
  assert (changed.sharding.mode, changed.model_kwargs['hidden'], changed.learning_rate) == ('fsdp', 16, 0.5)
  assert base.sharding.mode == 'dp'
  with pytest.raises(ValueError, match='unknown config field'):
    train_cli.apply_override(base, 'nope=1')
  with pytest.raises(ValueError, match='unknown variant'):
    module.get_config('nope')
  for name in ('co2_rnn', 'resnet_bench', 'digits_transformed'):
    assert isinstance(train_cli.load_config_module(f'pipelines/configs/{name}.py').get_config('runlocal'), TrainConfig)


def test_transformed_kind_needs_its_transform_output(digits):
  """kind='transformed' reads tf.Transform output only (the end-to-end tests
  in test_preprocess / test_train_on_transformed run it on real records)."""
  cfg = DataConfig(kind='transformed', shape=(8, 8, 1), features=('image',))
  with pytest.raises(ValueError, match='needs transform_dir and features'):
    input_pipeline.make_dataset(cfg, digits[1], 8, train=False)
  assert not cfg.is_sequence and DataConfig(kind='transformed', max_len=4).is_sequence
  assert DataConfig(kind='sequences').is_sequence and not IMAGES.is_sequence
  with pytest.raises(ValueError, match="'images', 'sequences' or 'transformed'"):
    input_pipeline.make_dataset(DataConfig(kind='nope'), digits[1], 8, train=False)
