"""The flagship demo end to end, through its command line, as a user runs it."""

import json
import os
import re
import subprocess
import sys

import pytest

from beam_dl.models import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_command_line(tmp_path):
  workdir = tmp_path / 'demo'
  completed = subprocess.run(
    [sys.executable, '-m', 'pipelines.demo', f'--workdir={workdir}', '--train_steps=400'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  line = re.search(
    r'held-out accuracy ([\d.]+) \| inputs (\d+) \| predictions (\d+) \| dead letters (\d+)', completed.stdout
  )
  assert line, completed.stdout
  accuracy, inputs, predictions, dead = float(line[1]), int(line[2]), int(line[3]), int(line[4])
  assert accuracy >= 0.95
  assert (inputs, predictions, dead) == (362, 360, 2)  # 20% of 1,797 digits + 2 broken files
  assert re.search(r'[\d.]+ images/s', completed.stdout)
  assert 'fit_arrays:' in completed.stderr and 'steps/s eta' in completed.stderr  # progress with rate + ETA
  assert len(list((workdir / 'images' / 'train').iterdir())) == 1437
  spec = checkpoints.load_spec(str(workdir / 'model'))  # loadable by --model_dir
  assert spec.name == 'small_cnn' and tuple(spec.input_shape) == (8, 8, 1)
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['dead_letters'] == 2 and summary['accuracy'] == accuracy
