"""A service's `python -m` entry stops what it started on SIGTERM as on Ctrl-C.

Real processes: a small entry built from `beam_dl.services.process` (a child
`sleep` in its own process group, as the JVMs are), and the project's Kafka
broker (`python -m beam_dl.services.kafka`, when its jars are there). The
wrapper alone gets the signal, as `kill -TERM %1` sends it; afterwards none
of its children may remain.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from beam_dl.services import hdfs as hdfs_service
from beam_dl.services import kafka as kafka_service
from beam_dl.services import kafka_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A service entry: a child in its own group (never signalled by the shell), ready after `READY_S` seconds.
ENTRY = """
import subprocess, sys, time
from beam_dl.services.process import serve_until_stopped, service_process, stopped_by_signals
start = time.monotonic()
with stopped_by_signals(), service_process(['sleep', '300'], log_path=sys.argv[1], timeout_s=60,
                                           ready=lambda: time.monotonic() - start > float(sys.argv[2])) as child:
  print(child.pid, flush=True)
  serve_until_stopped()
print('stopped', flush=True)
"""


def _children(pid: int) -> list[int]:
  """Every process whose parent is `pid` (from /proc)."""
  found = []
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
            found.append(int(entry))
      except (OSError, IndexError, ValueError):
        pass
  return found


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


def _start(args, tmp_path):
  env = {**os.environ, 'PYTHONPATH': REPO}
  return subprocess.Popen(
    [sys.executable, *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=open(tmp_path / 'stderr', 'wb'),
    text=True,
  )


def _stop_and_check(wrapper, children, tmp_path, timeout_s=60):
  assert children and all(_alive(c) for c in children)
  wrapper.send_signal(signal.SIGTERM)
  try:
    assert wrapper.wait(timeout_s) == 0, (tmp_path / 'stderr').read_text()[-3000:]
  finally:
    for child in children:  # never leave one behind, even when the check fails
      if _alive(child):
        os.killpg(child, signal.SIGKILL)
  deadline = time.monotonic() + 10
  while any(_alive(c) for c in children) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not [c for c in children if _alive(c)], 'children outlived their wrapper'
  assert 'Traceback' not in (tmp_path / 'stderr').read_text()


@pytest.mark.timeout(60)
def test_sigterm_stops_the_services_children(tmp_path):
  wrapper = _start(['-c', ENTRY, str(tmp_path / 'log'), '0'], tmp_path)
  child = int(wrapper.stdout.readline())
  _stop_and_check(wrapper, [child], tmp_path)
  assert wrapper.stdout.read() == 'stopped\n'


@pytest.mark.timeout(60)
def test_sigterm_during_start_up_stops_the_children(tmp_path):
  wrapper = _start(['-c', ENTRY, str(tmp_path / 'log'), '30'], tmp_path)  # not ready for 30 s
  deadline = time.monotonic() + 20
  while not _children(wrapper.pid) and time.monotonic() < deadline:
    time.sleep(0.05)
  _stop_and_check(wrapper, _children(wrapper.pid), tmp_path)


@pytest.mark.timeout(180)
@pytest.mark.skipif(not kafka_service.jars_available(), reason='no Kafka jars: run `make kafka-jars` (CI does)')
def test_sigterm_stops_the_kafka_broker_and_topics_were_made(tmp_path):
  from confluent_kafka.admin import AdminClient

  wrapper = _start(['-m', 'beam_dl.services.kafka', '--topics', 'events,scores'], tmp_path)
  try:
    bootstrap = wrapper.stdout.readline().strip()
    assert bootstrap.startswith('127.0.0.1:'), (tmp_path / 'stderr').read_text()[-3000:]
    topics = AdminClient({'bootstrap.servers': bootstrap}).list_topics(timeout=10).topics
    assert {'events', 'scores'} <= set(topics)
  except BaseException:
    wrapper.kill()
    raise
  _stop_and_check(wrapper, _children(wrapper.pid), tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not hdfs_service.hadoop_jars(), reason='no Hadoop jars: run `make hdfs` (CI does)')
def test_sigterm_stops_hdfs_and_it_leaves_nothing_in_the_current_directory(tmp_path):
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  wrapper = subprocess.Popen(
    [sys.executable, '-m', 'beam_dl.services.hdfs'],
    cwd=cwd,
    stdout=subprocess.PIPE,
    stderr=open(tmp_path / 'stderr', 'wb'),
    text=True,
    env={**os.environ, 'PYTHONPATH': REPO},
  )
  try:
    flags = wrapper.stdout.readline().split()
    assert flags[0] == '--hdfs_host=127.0.0.1', (tmp_path / 'stderr').read_text()[-3000:]
    port = flags[1].split('=')[1]
    assert hdfs_service.http_ok(f'http://127.0.0.1:{port}/webhdfs/v1/?op=GETFILESTATUS&user.name=beam')
  except BaseException:
    wrapper.kill()
    raise
  _stop_and_check(wrapper, _children(wrapper.pid), tmp_path)
  assert os.listdir(cwd) == []  # no ./target


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(bool(kafka_io.unavailable()), reason=f'{kafka_io.unavailable()} (CI does)')
def test_sigterm_stops_the_flink_job_server_and_expansion_service(tmp_path):
  wrapper = _start(['-m', 'beam_dl.services.kafka_io'], tmp_path)
  try:
    flags = wrapper.stdout.readline()
    assert flags.startswith('--runner FlinkRunner --job_endpoint localhost:'), (tmp_path / 'stderr').read_text()[-3000:]
  except BaseException:
    wrapper.kill()
    raise
  children = _children(wrapper.pid)
  assert len(children) == 2  # the expansion service and the job server, each a JVM in its own group
  _stop_and_check(wrapper, children, tmp_path)
