"""Resuming from damaged training checkpoints, written by a real short run.

The newest checkpoint is cut short (as a killed upload leaves it): resume
falls back to the newest good step and says which step it skipped and why;
with every step damaged the error names the directory and the steps.
"""

import logging
import os

import jax
import pytest

from beam_dl.models.checkpoints import CheckpointError
from beam_dl.training import datasets, trainer
from beam_dl.training.config import DataConfig, ShardingConfig, TrainConfig


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  return datasets.write_digits(str(tmp_path_factory.mktemp('digits')))


def config(files):
  train, _ = files
  return TrainConfig(
    model='small_cnn',
    model_kwargs=dict(num_classes=10, features=[4], hidden=8),
    data=DataConfig(kind='images', train_files=train, eval_files='', shape=(8, 8, 1), shuffle_buffer=64),
    input_scale=1 / 16,
    batch_size=16,
    num_steps=4,
    checkpoint_every=2,
    keep_checkpoints=3,
    learning_rate=3e-3,
    log_every=1,
    sharding=ShardingConfig(mode='dp'),
  )


def cut_short(step_dir):
  """Truncates every array data file of one checkpoint step to half its size."""
  cut = 0
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      if 'METADATA' in name.upper() or name.endswith('.json') or os.path.getsize(path) < 64:
        continue
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
      cut += 1
  assert cut, f'no data files under {step_dir}'


@pytest.mark.slow
def test_resume_skips_a_damaged_latest_checkpoint(digits, tmp_path, caplog):
  cfg, workdir = config(digits), str(tmp_path / 'run')
  devices = jax.devices()[:1]
  assert trainer.train_and_evaluate(cfg, workdir, devices=devices)['resumed_from'] == 0
  checkpoints_dir = os.path.join(workdir, trainer.CHECKPOINT_DIR)
  assert sorted(os.listdir(checkpoints_dir))[-2:] == ['2', '4']
  cut_short(os.path.join(checkpoints_dir, '4'))
  cfg.num_steps = 6
  with caplog.at_level(logging.WARNING):
    summary = trainer.train_and_evaluate(cfg, workdir, devices=devices)
  assert summary['resumed_from'] == 2  # step 4 was damaged: the newest good one is 2
  assert os.path.isdir(os.path.join(checkpoints_dir, '4.damaged'))  # set aside, and step 4 saved anew
  skipped = [r.getMessage() for r in caplog.records if 'cannot be restored' in r.getMessage()]
  assert len(skipped) == 1 and 'step 4' in skipped[0] and checkpoints_dir in skipped[0]
  # every step damaged: a clear error naming the directory and the steps
  for step in [s for s in os.listdir(checkpoints_dir) if s.isdigit()]:
    cut_short(os.path.join(checkpoints_dir, step))
  cfg.num_steps = 8
  with pytest.raises(CheckpointError) as error:
    trainer.train_and_evaluate(cfg, workdir, devices=devices)
  message = str(error.value)
  assert message.startswith(checkpoints_dir) and 'step 6' in message and 'step 2' in message
