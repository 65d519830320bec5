"""`beam_dl.training.launch`: N processes started together, given their JAX
environment, and stopped together when one fails or the launcher is
signalled (plain Python children: no JAX needed to check the process handling)."""

import os
import signal
import subprocess
import sys
import time

from beam_dl.training import launch
from pipelines import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code):
  return [sys.executable, '-c', code]


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_every_process_gets_its_index_and_one_coordinator(tmp_path):
  code = (
    "import os; e = os.environ; open(os.path.join(%r, e['JAX_PROCESS_ID']), 'w').write("
    "e['JAX_COORDINATOR_ADDRESS'] + ' ' + e['JAX_NUM_PROCESSES'])" % str(tmp_path)
  )
  assert launch.launch_local(python(code), 3) == 0
  written = {name: (tmp_path / name).read_text() for name in os.listdir(tmp_path)}
  assert sorted(written) == ['0', '1', '2']
  assert len(set(written.values())) == 1 and written['0'].startswith('127.0.0.1:') and written['0'].endswith(' 3')


def test_one_failure_stops_the_others_and_is_the_exit_code(tmp_path):
  code = (
    "import os, time; i = os.environ['JAX_PROCESS_ID']; open(os.path.join(%r, 'pid' + i), 'w')"
    ".write(str(os.getpid())); time.sleep(0.5) if i == '1' else time.sleep(600); raise SystemExit(3)" % str(tmp_path)
  )
  t0 = time.monotonic()
  assert launch.launch_local(python(code), 3, grace_s=1) == 3
  assert time.monotonic() - t0 < 60  # the sleepers were stopped, not waited for
  assert not any(alive(int((tmp_path / f'pid{i}').read_text())) for i in range(3))


def test_sigterm_to_the_launcher_stops_every_process(tmp_path):
  child = "import os, time; open(os.path.join(%r, os.environ['JAX_PROCESS_ID']), 'w').write(str(os.getpid())); time.sleep(600)"
  proc = subprocess.Popen(
    [sys.executable, '-m', 'beam_dl.training.launch', '--processes', '2', '--', *python(child % str(tmp_path))],
    cwd=ROOT,
    start_new_session=True,
  )
  try:
    deadline = time.monotonic() + 60
    while len(os.listdir(tmp_path)) < 2 or any((tmp_path / n).stat().st_size == 0 for n in os.listdir(tmp_path)):
      assert time.monotonic() < deadline and proc.poll() is None
      time.sleep(0.1)
    pids = [int((tmp_path / n).read_text()) for n in ('0', '1')]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert not any(alive(p) for p in pids)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()


def test_train_cli_passes_everything_but_processes_on():
  argv = ['--config', 'c.py', '--processes', '2', '--workdir', 'w', '--processes=3', '--cpu_devices', '2']
  assert train_cli._without_processes(argv) == ['--config', 'c.py', '--workdir', 'w', '--cpu_devices', '2']
