"""LSTM forecaster on the Mauna Loa CO2 record (statsmodels), as SequenceExamples.

    python -m pipelines.train --config pipelines/configs/co2_rnn.py --workdir /tmp/co2
    python -m pipelines.train --config pipelines/configs/co2_rnn.py:runlocal --workdir /tmp/co2_local

Each example is 24 months of CO2 relative to the last month; the target is
next month's change (ppm). Eval is the last 20% of the record in time.
Metric `skill_vs_zero` = 1 - MSE / MSE(predict no change): expect ~0.9.
Variants: `runlocal` (100 steps), `gru`, `bidirectional` (bi-GRU with
attention pooling), `fsdp`.
"""

import glob

from beam_dl.training import datasets
from beam_dl.training.config import DataConfig, ShardingConfig, TrainConfig

WINDOW = 24


def get_config(variant=None):
  config = TrainConfig(
    model='rnn',
    model_kwargs={'cell': 'lstm', 'hidden_size': 32, 'pooling': 'last', 'num_outputs': 1, 'head': 'regression'},
    task='regression',
    data=DataConfig(
      kind='sequences', shape=(None, 1), max_len=WINDOW, target='target', num_targets=1, shuffle_buffer=1024
    ),
    input_dtype='float32',
    batch_size=32,
    eval_batch_size=128,
    num_steps=400,
    learning_rate=1e-2,
    warmup_steps=20,
    log_every=50,
    checkpoint_every=100,
  )
  if variant in (None, ''):
    return config
  if variant == 'runlocal':
    return config.replace(num_steps=100, log_every=25, checkpoint_every=50)
  if variant == 'gru':
    return config.replace(model_kwargs={**config.model_kwargs, 'cell': 'gru'})
  if variant == 'bidirectional':
    return config.replace(
      model_kwargs={**config.model_kwargs, 'cell': 'gru', 'bidirectional': True, 'pooling': 'attention'}
    )
  if variant == 'fsdp':
    return config.replace(sharding=ShardingConfig(mode='fsdp'))
  raise ValueError(f'unknown variant {variant!r}')


def prepare(config, data_dir):
  """Writes the CO2 windows (once) and points the config at them."""
  if config.data.train_files:  # files given with --set data.train_files=...
    return config
  train = f'{data_dir}/co2_train-*-of-00002.tfrecord'
  if not glob.glob(train):
    datasets.write_co2(data_dir, window=WINDOW)
  config.data.train_files = train
  config.data.eval_files = f'{data_dir}/co2_eval-*-of-00002.tfrecord'
  return config
