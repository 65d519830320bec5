"""Sharded training end to end on real data (digits, Mauna Loa CO2), 8 fake CPUs.

- data parallel, FSDP, tensor parallel and pmap follow the single-device loss
  trajectory;
- a run killed after a checkpoint resumes to exactly the uninterrupted result;
- real training reaches a stated quality, and the exported model serves it.
"""

import json
import os

import jax
import numpy as np
import pytest

from beam_dl.models import checkpoints
from beam_dl.training import datasets, input_pipeline, trainer
from beam_dl.training.config import DataConfig, ShardingConfig, TrainConfig
from pipelines import train as train_cli


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  return datasets.write_digits(str(tmp_path_factory.mktemp('digits')))


@pytest.fixture(scope='module')
def co2(tmp_path_factory):
  return datasets.write_co2(str(tmp_path_factory.mktemp('co2')))


def _cnn_config(files, mode='dp', **kwargs):
  train, eval_ = files
  defaults = dict(
    model='small_cnn',
    model_kwargs=dict(num_classes=10, features=[8, 16], hidden=32),
    data=DataConfig(kind='images', train_files=train, eval_files=eval_, shape=(8, 8, 1), shuffle_buffer=512),
    input_scale=1 / 16,
    batch_size=32,
    eval_batch_size=64,
    num_steps=8,
    learning_rate=3e-3,
    log_every=1,
    sharding=ShardingConfig(mode=mode, model_parallelism=2 if mode == 'tensor' else 1),
  )
  return TrainConfig(**{**defaults, **kwargs})


def _rnn_config(files, **kwargs):
  train, eval_ = files
  defaults = dict(
    model='rnn',
    model_kwargs=dict(cell='lstm', hidden_size=32, num_outputs=1, head='regression'),
    task='regression',
    input_dtype='float32',
    data=DataConfig(
      kind='sequences',
      train_files=train,
      eval_files=eval_,
      shape=(None, 1),
      max_len=24,
      target='target',
      shuffle_buffer=512,
    ),
    batch_size=32,
    eval_batch_size=64,
    num_steps=300,
    learning_rate=1e-2,
    warmup_steps=20,
    log_every=50,
  )
  return TrainConfig(**{**defaults, **kwargs})


def _losses(summary):
  return np.array([h['loss'] for h in summary['history']])


@pytest.mark.slow
def test_sharded_modes_follow_the_single_device_loss_trajectory(digits, tmp_path):
  single = trainer.train_and_evaluate(_cnn_config(digits), str(tmp_path / 'one'), devices=jax.devices()[:1])
  reference = _losses(single)
  assert len(reference) == 8 and reference[-1] < reference[0]
  for mode in ('dp', 'fsdp', 'tensor', 'pmap'):
    # Eval (shard_map metric sums over padded batches) checked once, in dp.
    cfg = _cnn_config(digits, mode)
    if mode != 'dp':
      cfg.data.eval_files = ''
    summary = trainer.train_and_evaluate(cfg, str(tmp_path / mode))
    assert summary['devices'] == (4 if mode == 'tensor' else 8)
    np.testing.assert_allclose(_losses(summary), reference, rtol=2e-4, err_msg=mode)
    if mode == 'dp':
      assert summary['eval']['examples'] == 359  # padded eval batches count each example once
      np.testing.assert_allclose(summary['eval']['accuracy'], single['eval']['accuracy'], atol=1 / 359)
      np.testing.assert_allclose(summary['eval']['loss'], single['eval']['loss'], rtol=1e-4)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(co2, tmp_path):
  # Dropout, gradient accumulation and FSDP: everything that could drift.
  cfg = _rnn_config(
    co2,
    model_kwargs=dict(cell='gru', hidden_size=16, num_outputs=1, head='regression', dropout_rate=0.2),
    num_steps=12,
    checkpoint_every=4,
    grad_accum_steps=2,
    log_every=2,
    sharding=ShardingConfig(mode='fsdp'),
  )

  class Killed(Exception):
    pass

  def kill_at_step_10(step, state, metrics):
    if step == 10:
      raise Killed

  with pytest.raises(Killed):
    trainer.train_and_evaluate(cfg, str(tmp_path / 'killed'), hooks=[kill_at_step_10])
  assert not os.path.exists(tmp_path / 'killed' / 'model')
  resumed = trainer.train_and_evaluate(cfg, str(tmp_path / 'killed'))
  straight = trainer.train_and_evaluate(cfg, str(tmp_path / 'straight'))
  assert resumed['resumed_from'] == 8 and straight['resumed_from'] == 0
  np.testing.assert_array_equal(_losses(resumed), _losses(straight)[-2:])  # steps 10 and 12
  _, resumed_vars = checkpoints.load(str(tmp_path / 'killed' / 'model'))
  _, straight_vars = checkpoints.load(str(tmp_path / 'straight' / 'model'))
  for a, b in zip(jax.tree_util.tree_leaves(resumed_vars), jax.tree_util.tree_leaves(straight_vars)):
    np.testing.assert_array_equal(a, b)


def test_digits_cnn_cli_reaches_97_percent_and_the_export_serves_it(tmp_path):
  workdir = str(tmp_path / 'run')
  summary = train_cli.main(
    [
      '--config',
      'pipelines/configs/digits_cnn.py:runlocal',
      '--workdir',
      workdir,
      '--set',
      'num_steps=120',
      '--set',
      'sharding.mode=fsdp',
      '--log_level',
      'WARNING',
    ]
  )
  assert summary['eval']['accuracy'] >= 0.97
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['sharding']['mode'] == 'fsdp'
  # Serve the export the way the handler does: input_dtype, scale, offset, apply.
  spec, variables = checkpoints.load(os.path.join(workdir, 'model'))
  assert spec.input_dtype == 'uint8' and tuple(spec.input_shape) == (8, 8, 1)
  model = spec.build()
  eval_files = os.path.join(workdir, 'data', 'digits_eval-*-of-00004.tfrecord')
  ds = input_pipeline.make_dataset(DataConfig(kind='images', shape=(8, 8, 1)), eval_files, 512, train=False)
  correct = total = 0
  for batch in ds.as_numpy_iterator():
    x = batch['inputs'].astype(spec.input_dtype).astype(np.float32) * spec.input_scale + spec.input_offset
    correct += int((np.argmax(model.apply(variables, x), -1) == batch['label']).sum())
    total += len(batch['label'])
  assert total == 359
  assert correct / total == pytest.approx(summary['eval']['accuracy'], abs=1e-9)
  # The export carries the profile of its training inputs (pixels 0..16: brightness near 0.02 of 255).
  from beam_dl.operations import drift

  profile = drift.load_profile(os.path.join(workdir, 'model'))
  assert set(profile.features) == set(drift.IMAGE_FEATURES)
  assert profile.features['image/brightness'].count == 1438  # every training example (< PROFILE_EXAMPLES)
  assert 0.01 < profile.features['image/brightness'].edges[0] < profile.features['image/brightness'].edges[-1] < 0.04


def test_co2_lstm_forecasts_next_month_with_skill(co2, tmp_path):
  summary = trainer.train_and_evaluate(_rnn_config(co2), str(tmp_path), devices=jax.devices()[:1])
  losses = _losses(summary)
  assert losses[-1] < 0.5 * losses[0]
  # Held-out final 20% of the record (the future): explains >= 80% of the
  # variance of the monthly change that a no-change forecast leaves.
  assert summary['eval']['skill_vs_zero'] >= 0.8
  spec, variables = checkpoints.load(str(tmp_path / 'model'))
  assert spec.name == 'rnn' and tuple(spec.input_shape) == (None, 1)
  assert spec.task == 'sequence_regression'
  # The serving handler loads the export and pads variable-length sequences
  # to its length buckets; answers match the model on the unpadded sequence.
  from beam_dl.serving.handler import JaxModelHandler

  handler = JaxModelHandler(str(tmp_path / 'model'))
  windows, _ = datasets.co2_windows(24)
  examples = [windows[-1], windows[-2][-9:]]
  served = [r.inference for r in handler.run_inference(examples, handler.load_model())]
  model = spec.build()
  for example, answer in zip(examples, served):
    direct = model.apply(variables, example[None], np.ones((1, len(example)), bool))
    np.testing.assert_allclose(answer, direct[0], rtol=1e-5, atol=1e-6)
