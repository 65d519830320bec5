"""Training writes TensorBoard summaries that read back; pipelines.train draws them to a PNG."""

import os

import pytest


def test_summary_writer_round_trip_and_plot(tmp_path):
  from PIL import Image

  from beam_dl.training.summaries import SummaryWriter, plot_curves, read_scalars

  writer = SummaryWriter(str(tmp_path / 'tb'))
  for step in (10, 20, 30):
    writer.scalars('train', step, {'loss': 1.0 / step, 'learning_rate': 0.1, 'skipped': float('nan')})
  writer.scalars('eval', 30, {'accuracy': 0.9})
  writer.close()
  scalars = read_scalars(str(tmp_path / 'tb'))
  loss = scalars['train']['loss']
  assert [s for s, _ in loss] == [10, 20, 30] and [v for _, v in loss] == pytest.approx([0.1, 0.05, 1 / 30])
  assert 'skipped' not in scalars['train']
  assert scalars['eval'] == {'accuracy': [(30, pytest.approx(0.9))]}
  png = plot_curves(str(tmp_path / 'tb'), str(tmp_path / 'curves.png'))
  with Image.open(png) as image:
    image.load()
    assert image.format == 'PNG' and image.width > 400


@pytest.mark.slow
def test_pipelines_train_writes_event_files_and_a_png(tmp_path):
  """A real short run of the digits config: summaries per logging step, eval, and the PNG."""
  from PIL import Image

  from beam_dl.training.summaries import read_scalars
  from pipelines import train

  workdir = str(tmp_path / 'run')
  summary = train.main(
    [
      '--config',
      'pipelines/configs/digits_cnn.py:runlocal',
      '--workdir',
      workdir,
      '--set',
      'num_steps=40',
      '--set',
      'log_every=10',
      '--set',
      'eval_every=20',
      '--set',
      'warmup_steps=0',
      '--plot',
      str(tmp_path / 'curves.png'),
    ]
  )
  scalars = read_scalars(os.path.join(workdir, 'tensorboard'))
  train_tags = scalars['train']
  assert {'loss', 'learning_rate', 'steps_per_sec', 'examples_per_sec', 'input_wait_fraction'} <= set(train_tags)
  assert [s for s, _ in train_tags['loss']] == [10, 20, 30, 40]
  assert train_tags['loss'][-1][1] < train_tags['loss'][0][1]  # it learned
  assert all(v > 0 for _, v in train_tags['examples_per_sec'])
  lrs = [v for _, v in train_tags['learning_rate']]
  assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]  # cosine decay
  eval_steps = {s for points in scalars['eval'].values() for s, _ in points}
  assert eval_steps == {20, 40}
  assert scalars['eval'][next(iter(scalars['eval']))][-1][1] == pytest.approx(
    summary['eval'][next(iter(scalars['eval']))], rel=1e-5
  )
  with Image.open(summary['plot']) as image:
    image.load()
    assert image.format == 'PNG' and image.size[0] > 400
