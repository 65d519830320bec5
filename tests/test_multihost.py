"""Training as several JAX processes on this machine: real processes, gloo collectives.

`pipelines.train --processes 2 --cpu_devices 2` (two processes of two CPU
devices, one 4-device mesh) against `--cpu_devices 4` (one process): the
same config and global batch give the same loss curve (data order made
topology-free with `data.process_split=batch`) and, with each process
reading its own files, an eval accuracy within 1 point and a loss within
10% at each of the config's logged steps (means over 50 steps). A process SIGKILLed mid-run ends the other with an error
within the heartbeat timeout (no hang); the launcher reports it, and a
rerun resumes both processes from the same checkpoint. The data split:
every training example is in exactly one global batch per epoch; pmap is
refused in a multi-process run.

Every process started here runs in its own process group with a hard
timeout; a hang kills the group and fails the test.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from beam_dl.formats.image_example import encode_image_example
from beam_dl.training import datasets, summaries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
STEPS = 150  # the runlocal config's own length
TRAIN = [
  '-m',
  'pipelines.train',
  '--config',
  'pipelines/configs/digits_cnn.py:runlocal',
  '--tensorboard_dir',
  'tensorboard',
  '--set',
  f'num_steps={STEPS}',
  '--set',
  'log_every=10',
  '--set',
  'checkpoint_every=20',
]


def env(devices: int) -> dict:
  return {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'JAX_DISTRIBUTED_TIMEOUT_S': '20',
    'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
  }


def start(args, log_path, devices=2):
  return subprocess.Popen(
    [sys.executable, *args],
    cwd=ROOT,
    env=env(devices),
    stdout=open(log_path, 'w'),
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )


def finish(proc, log_path, timeout=TIMEOUT_S) -> tuple[int, str]:
  """(exit code, log); on timeout the whole group is killed and the test fails."""
  try:
    proc.wait(timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pytest.fail(f'hung for {timeout}s (killed): {open(log_path).read()[-3000:]}')
  return proc.returncode, open(log_path).read()


def train(workdir, data_dir, *extra, processes=1) -> tuple[int, str]:
  args = [*TRAIN, '--workdir', str(workdir), '--data_dir', str(data_dir), *extra]
  if processes > 1:
    args += ['--processes', str(processes), '--cpu_devices', str(4 // processes)]
  log = f'{workdir}.log'
  return finish(start(args, log, devices=4 // processes), log)


def losses(workdir) -> dict[int, float]:
  return dict(summaries.read_scalars(os.path.join(workdir, 'tensorboard'))['train']['loss'])


def summary(workdir) -> dict:
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('digits')
  datasets.write_digits(str(out))
  return out


@pytest.fixture(scope='module')
def single(tmp_path_factory, data_dir):
  """1 process x 4 devices (the reference run)."""
  workdir = tmp_path_factory.mktemp('runs') / 'p1x4'
  code, log = train(workdir, data_dir, '--set', 'data.process_split=batch')
  assert code == 0, log[-3000:]
  return workdir


@pytest.mark.slow
def test_two_processes_follow_the_loss_curve_of_one(tmp_path, data_dir, single):
  workdir = tmp_path / 'p2x2'
  code, log = train(workdir, data_dir, '--set', 'data.process_split=batch', processes=2)
  assert code == 0, log[-3000:]
  assert '[process 0/2]' in log and '[process 1/2]' in log
  one, two = losses(single), losses(workdir)
  assert sorted(one) == sorted(two) == list(range(10, STEPS + 1, 10))
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
  assert summary(workdir)['devices'] == summary(single)['devices'] == 4
  assert abs(summary(workdir)['eval']['accuracy'] - summary(single)['eval']['accuracy']) <= 0.01
  assert summary(workdir)['eval']['examples'] == 359
  assert os.path.exists(workdir / 'model' / 'spec.json')  # exported by process 0, no hang at the end


@pytest.mark.slow
def test_killed_process_ends_the_run_and_a_rerun_resumes(tmp_path, data_dir, single):
  workdir = tmp_path / 'p2x2'
  args = [*TRAIN, '--workdir', str(workdir), '--data_dir', str(data_dir), '--processes', '2', '--cpu_devices', '2']
  log_path = f'{workdir}.killed.log'
  proc = start(args, log_path)
  deadline = time.monotonic() + TIMEOUT_S
  while not (workdir / 'checkpoints' / '40').is_dir():
    assert proc.poll() is None and time.monotonic() < deadline, open(log_path).read()[-3000:]
    time.sleep(0.1)
  pid = int(re.search(r'process 1 of 2: pid (\d+)', open(log_path).read()).group(1))
  os.kill(pid, signal.SIGKILL)
  code, log = finish(proc, log_path, timeout=120)
  assert code == 1, log[-3000:]
  assert 'run failed: process 0: signal SIGABRT, process 1: signal SIGKILL' in log, log[-3000:]
  assert 'stopped sending heartbeats' in log  # process 0 ended itself: JAX's heartbeat timeout
  assert not (workdir / 'model').exists()

  code, log = finish(start(args, f'{workdir}.log'), f'{workdir}.log')
  assert code == 0, log[-3000:]
  resumed = re.findall(r'\[process (\d)/2\] INFO resumed from checkpoint at step (\d+)', log)
  assert sorted(p for p, _ in resumed) == ['0', '1'] and len({s for _, s in resumed}) == 1, resumed
  assert summary(workdir)['resumed_from'] == int(resumed[0][1]) >= 40
  assert summary(workdir)['steps'] == STEPS
  # Each process read its own files, in another order than the 1-process run: close, not equal. Compared
  # as the config logs them (means over log_every=50 steps): 10-step means of ~0.05 differ by more than 10%
  # from batch noise alone.
  one, two = losses(single), losses(workdir)
  for end in range(50, STEPS + 1, 50):
    window = range(end - 40, end + 1, 10)
    mean_one, mean_two = np.mean([one[s] for s in window]), np.mean([two[s] for s in window])
    assert mean_two == pytest.approx(mean_one, rel=0.1), (end, one, two)
  assert abs(summary(workdir)['eval']['accuracy'] - summary(single)['eval']['accuracy']) <= 0.01


def write_numbered(out_dir, count=96, num_shards=4) -> str:
  """Images whose first two pixels spell their number n, n in shard n % num_shards; returns the glob."""
  records = []
  for n in range(count):
    image = np.zeros((8, 8, 1), np.uint8)
    image[0, 0, 0], image[0, 1, 0] = divmod(n, 256)
    records.append(encode_image_example(f'n/{n}', image, n % 10))
  return datasets.write_shards(records, os.path.join(out_dir, 'numbered'), num_shards)


@pytest.mark.slow
def test_each_example_once_per_epoch_across_processes(tmp_path):
  pattern = write_numbered(str(tmp_path))
  out, log_path = tmp_path / 'seen.json', tmp_path / 'data.log'
  epoch_steps, global_batch = 6, 16  # 96 examples
  proc = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'beam_dl.training.launch',
      '--processes',
      '2',
      '--',
      sys.executable,
      '-m',
      'tests.multihost_data',
      str(out),
      pattern,
      str(2 * epoch_steps),
      str(global_batch),
    ],
    cwd=ROOT,
    env=env(2),
    stdout=open(log_path, 'w'),
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )
  code, log = finish(proc, log_path, timeout=180)
  assert code == 0, log[-3000:]
  seen = json.loads(out.read_text())
  assert (seen['processes'], seen['devices']) == (2, 4)
  assert seen['pmap'].startswith('sharding.mode=pmap runs in one process, this run has 2'), seen['pmap']
  for epoch in range(2):
    steps = seen['steps'][epoch * epoch_steps : (epoch + 1) * epoch_steps]
    assert sorted(n for step in steps for n in step) == list(range(96)), f'epoch {epoch}: not each example once'
  # Process 0 reads shards 0 and 2 and fills rows 0..7 of each global batch; process 1 shards 1, 3 and rows 8..15.
  for step in seen['steps']:
    assert {n % 2 for n in step[:8]} == {0} and {n % 2 for n in step[8:]} == {1}, step
