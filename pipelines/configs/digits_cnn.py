"""SmallCNN on scikit-learn's 8x8 digits, written as image TFRecords.

    python -m pipelines.train --config pipelines/configs/digits_cnn.py --workdir /tmp/digits
    python -m pipelines.train --config pipelines/configs/digits_cnn.py:runlocal --workdir /tmp/digits_local

Variants: (none) 1,000 steps data parallel; `runlocal` 150 steps; `fsdp`,
`tensor` (2-way model parallel: on a CPU add `--cpu_devices 2`), `pmap`: same
model under another sharding;
`resnet_tiny`: the tiny ResNet with batch norm; `focal`: focal loss plus
label smoothing. Expect ~98% eval accuracy (359 held-out digits).
"""

import glob

from beam_dl.training import datasets
from beam_dl.training.config import DataConfig, ShardingConfig, TrainConfig


def get_config(variant=None):
  config = TrainConfig(
    model='small_cnn',
    model_kwargs={'num_classes': 10, 'features': [32, 64], 'hidden': 128},
    task='classification',
    labels=[str(i) for i in range(10)],
    data=DataConfig(kind='images', shape=(8, 8, 1), shuffle_buffer=2048),
    input_dtype='uint8',
    input_scale=1 / 16,  # digits pixels are 0..16
    batch_size=64,
    eval_batch_size=128,
    num_steps=1000,
    learning_rate=3e-3,
    warmup_steps=50,
    weight_decay=1e-4,
    log_every=100,
    eval_every=500,
    checkpoint_every=250,
  )
  if variant in (None, ''):
    return config
  if variant == 'runlocal':
    return config.replace(num_steps=150, log_every=50, eval_every=0, checkpoint_every=50)
  if variant in ('fsdp', 'pmap'):
    return config.replace(sharding=ShardingConfig(mode=variant))
  if variant == 'tensor':
    return config.replace(sharding=ShardingConfig(mode='tensor', model_parallelism=2))
  if variant == 'resnet_tiny':
    return config.replace(model='resnet_tiny', model_kwargs={'num_classes': 10}, learning_rate=1e-2)
  if variant == 'focal':
    return config.replace(focal_gamma=2.0, label_smoothing=0.1)
  raise ValueError(f'unknown variant {variant!r}')


def prepare(config, data_dir):
  """Writes the digits TFRecords (once) and points the config at them."""
  if config.data.train_files:  # files given with --set data.train_files=...
    return config
  train = f'{data_dir}/digits_train-*-of-00004.tfrecord'
  if not glob.glob(train):
    train, _ = datasets.write_digits(data_dir)
  config.data.train_files = train
  config.data.eval_files = f'{data_dir}/digits_eval-*-of-00004.tfrecord'
  return config
