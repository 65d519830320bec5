"""ResNet-50 training throughput config (meant for a GPU), synthetic images.

    python -m pipelines.train --config pipelines/configs/resnet_bench.py --workdir /tmp/r50
    python -m pipelines.train --config pipelines/configs/resnet_bench.py:runlocal --workdir /tmp/r50_local

ResNet-50, bfloat16 compute (float32 params), 224x224x3, batch 256, SGD with
Nesterov momentum, through the real TFRecord input pipeline (random uint8
images: this measures speed, not accuracy). `runlocal`: the tiny ResNet on
32x32 images for a CPU smoke run. For the side-by-side input-vs-step figures
use `benchmarks/bench_training.py`.
"""

import glob

import numpy as np

from beam_dl.formats.image_example import encode_image_example
from beam_dl.training import datasets
from beam_dl.training.config import DataConfig, TrainConfig


def get_config(variant=None):
  config = TrainConfig(
    model='resnet50',
    model_kwargs={'num_classes': 1000, 'dtype': 'bfloat16'},
    task='classification',
    data=DataConfig(kind='images', shape=(224, 224, 3), shuffle_buffer=512, prefetch=4),
    input_dtype='uint8',
    input_scale=1 / 255,
    batch_size=256,
    eval_batch_size=256,
    num_steps=300,
    optimizer='sgd',
    learning_rate=0.1,
    warmup_steps=50,
    weight_decay=5e-5,
    label_smoothing=0.1,
    log_every=50,
  )
  if variant in (None, ''):
    return config
  if variant == 'runlocal':
    return config.replace(
      model='resnet_tiny',
      model_kwargs={'num_classes': 10},
      data=DataConfig(kind='images', shape=(32, 32, 3), shuffle_buffer=256),
      batch_size=16,
      eval_batch_size=16,
      num_steps=10,
      log_every=5,
    )
  if variant == 'remat':
    return config.replace(model_kwargs={**config.model_kwargs, 'remat': True})
  raise ValueError(f'unknown variant {variant!r}')


def prepare(config, data_dir, num_examples=None):
  """Writes random uint8 images of the config's shape (once)."""
  if config.data.train_files:  # files given with --set data.train_files=...
    return config
  shape = tuple(config.data.shape)
  tag = 'x'.join(map(str, shape))
  pattern = f'{data_dir}/synthetic_{tag}-*-of-00004.tfrecord'
  if not glob.glob(pattern):
    n = num_examples or max(4 * config.batch_size, 64)
    rng = np.random.default_rng(0)
    classes = config.model_kwargs.get('num_classes', 10)
    records = [
      encode_image_example(f'synthetic/{i}', rng.integers(0, 256, shape, np.uint8), int(rng.integers(classes)))
      for i in range(n)
    ]
    datasets.write_shards(records, f'{data_dir}/synthetic_{tag}', 4)
  config.data.train_files = pattern
  config.data.eval_files = pattern
  return config
