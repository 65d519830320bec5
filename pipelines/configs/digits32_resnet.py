"""A small ResNet on the digits upscaled 4x to 32x32 RGB: the compression
benchmark's ResNet (benchmarks/bench_compression.py), as image TFRecords.

    python -m pipelines.train --config pipelines/configs/digits32_resnet.py --workdir /tmp/r32
    python -m pipelines.train --config pipelines/configs/digits32_resnet.py:runlocal --workdir /tmp/r32_local

Compressing the trained model (the settings bench_compression measures):

    # int8
    python -m pipelines.compress --model_dir /tmp/r32/model --quantize int8 --output /tmp/r32_int8
    # pruned to 80% from the trained model, stem and head kept dense
    python -m pipelines.train --config pipelines/configs/digits32_resnet.py --workdir /tmp/r32_pruned \
        --set init_dir=/tmp/r32/model --set learning_rate=1e-3 --set warmup_steps=0 \
        --set compression.prune_sparsity=0.8 --set compression.prune_end_step=100 \
        --set compression.prune_every=5 --set "compression.prune_exclude=('conv_init', 'head')"
    # distilled student, 8 filters (3.9x fewer parameters), twice the steps
    python -m pipelines.train --config pipelines/configs/digits32_resnet.py:student --workdir /tmp/r32_student \
        --set compression.teacher_dir=/tmp/r32/model

ResNet v1.5 with stages (1, 1, 1) of 16/32/64 filters and a 3x3 stem (78k
parameters), 200 steps of batch 32: ~95% held-out accuracy (360 digits).
Variants: `runlocal` (20 steps), `student` (8 filters, 400 steps, T=4,
soft-loss weight 0.7; set compression.teacher_dir).
"""

import glob

import numpy as np

from beam_dl.formats.image_example import encode_image_example
from beam_dl.training import datasets
from beam_dl.training.config import CompressionConfig, DataConfig, TrainConfig

KWARGS = {'stage_sizes': [1, 1, 1], 'num_filters': 16, 'small_inputs': True, 'num_classes': 10}


def get_config(variant=None):
  config = TrainConfig(
    model='resnet',
    model_kwargs=dict(KWARGS),
    task='classification',
    labels=[str(i) for i in range(10)],
    data=DataConfig(kind='images', shape=(32, 32, 3), shuffle_buffer=2048),
    input_dtype='uint8',
    input_scale=1 / 16,  # digits pixels are 0..16
    batch_size=32,
    eval_batch_size=128,
    num_steps=200,
    learning_rate=3e-3,
    warmup_steps=50,
    weight_decay=1e-4,
    log_every=50,
    eval_every=0,
    checkpoint_every=0,
  )
  if variant in (None, ''):
    return config
  if variant == 'runlocal':
    return config.replace(num_steps=20, log_every=10)
  if variant == 'student':
    return config.replace(
      model_kwargs={**KWARGS, 'num_filters': 8},
      num_steps=400,
      compression=CompressionConfig(distill_temperature=4.0, distill_weight=0.7),
    )
  raise ValueError(f'unknown variant {variant!r}')


def prepare(config, data_dir):
  """Writes the 32x32 digits TFRecords (once) and points the config at them."""
  if config.data.train_files:  # files given with --set data.train_files=...
    return config
  train, test = f'{data_dir}/digits32_train-*', f'{data_dir}/digits32_eval-*'
  if not glob.glob(train):
    write_digits32(data_dir)
  config.data.train_files, config.data.eval_files = train, test
  return config


def write_digits32(data_dir: str) -> None:
  """The digits (0..16) upscaled 4x to 32x32, grey copied to RGB, 80/20 split."""
  from sklearn.datasets import load_digits

  d = load_digits()
  images = np.repeat(np.repeat(d.images, 4, 1), 4, 2).astype(np.uint8)
  images = np.repeat(images[..., None], 3, -1)
  order = np.random.default_rng(0).permutation(len(images))
  cut = int(0.8 * len(order))
  for name, idx in (('train', order[:cut]), ('eval', order[cut:])):
    records = [encode_image_example(f'{name}/{i}', images[i], int(d.target[i])) for i in idx]
    datasets.write_shards(records, f'{data_dir}/digits32_{name}', 4)
