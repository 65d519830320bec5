"""A one-node HDFS (NameNode + DataNode, Hadoop's MiniDFSClusterManager) on 127.0.0.1.

    make hdfs                                # once: Maven Central -> .cache/hadoop/lib
    python -m beam_dl.services.hdfs          # prints the Beam flags that reach it once ready,
                                             # runs until Ctrl-C or SIGTERM

    with hdfs_cluster(workdir) as hdfs:      # tests
      ... hdfs.beam_args ...                 # ['--hdfs_host=127.0.0.1', '--hdfs_port=...', ...]

Storage, logs and the cluster's details live under a working directory (a
fresh temporary one for `python -m`, removed on exit), never under the
caller's current directory (the minicluster's default is `./target`).
WebHDFS listens on a free port unless one is given; the JVM runs in its own
process group, polled ready with a deadline and stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from typing import Iterator

from beam_dl.services.process import ServiceError, free_port, serve_until_stopped, service_process, stopped_by_signals

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HADOOP_LIB = os.path.join(ROOT, '.cache', 'hadoop', 'lib')
JAVA_OPENS = [
  '--add-opens=java.base/java.lang=ALL-UNNAMED',
  '--add-opens=java.base/java.nio=ALL-UNNAMED',
  '--add-opens=java.base/sun.nio.ch=ALL-UNNAMED',
  '--add-opens=java.base/java.util=ALL-UNNAMED',
]


def http_ok(url: str) -> bool:
  """Whether `url` answers 200 now (a readiness probe for `service_process`)."""
  try:
    with urllib.request.urlopen(url, timeout=2) as r:
      return r.status == 200
  except OSError:
    return False


def hadoop_jars() -> list[str]:
  """The minicluster jars `make hdfs` copies into .cache/hadoop/lib ([] if absent)."""
  return sorted(glob.glob(os.path.join(HADOOP_LIB, '*.jar')))


@dataclasses.dataclass(frozen=True)
class Hdfs:
  """A running HDFS: Beam's --hdfs_* options reach it over WebHDFS."""

  host: str
  http_port: int
  namenode_port: int
  user: str = 'beam'
  pid: int | None = None  # the JVM (NameNode and DataNode in one)

  @property
  def beam_args(self) -> list[str]:
    return [f'--hdfs_host={self.host}', f'--hdfs_port={self.http_port}', f'--hdfs_user={self.user}']


@contextlib.contextmanager
def hdfs_cluster(workdir: str, timeout_s: float = 240, http_port: int | None = None) -> Iterator[Hdfs]:
  """One NameNode + one DataNode with storage under workdir; yields an Hdfs."""
  jars = hadoop_jars()
  if not jars:
    raise ServiceError(f'no jars in {HADOOP_LIB}: run `make hdfs`')
  os.makedirs(workdir, exist_ok=True)
  http_port = http_port or free_port()
  details = os.path.join(workdir, 'details.json')
  cmd = [
      'java', '-Xmx768m', *JAVA_OPENS, '-cp', os.pathsep.join(jars),
      'org.apache.hadoop.test.MiniDFSClusterManager',
      '-format', '-datanodes', '1', '-nnport', '0', '-httpport', str(http_port),
      '-writeDetails', details,
      '-D', 'dfs.permissions.enabled=false',
      '-D', 'dfs.namenode.rpc-address=127.0.0.1:0',
      '-D', 'dfs.datanode.address=127.0.0.1:0',
      '-D', 'dfs.datanode.http.address=127.0.0.1:0',
      '-D', 'dfs.datanode.ipc.address=127.0.0.1:0',
      '-D', f"hadoop.tmp.dir={os.path.join(workdir, 'tmp')}",
  ]  # fmt: skip
  url = f'http://127.0.0.1:{http_port}/webhdfs/v1/?op=GETFILESTATUS&user.name=beam'
  with service_process(
      cmd, log_path=os.path.join(workdir, 'hdfs.log'), cwd=workdir,
      ready=lambda: os.path.exists(details) and http_ok(url), timeout_s=timeout_s,
  ) as process:  # fmt: skip
    with open(details) as f:
      namenode_port = json.load(f)['namenode_port']
    yield Hdfs('127.0.0.1', http_port, namenode_port, pid=process.pid)


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog='python -m beam_dl.services.hdfs',
    description='A local one-node HDFS: prints the --hdfs_* flags that reach it once ready, runs until Ctrl-C '
    'or SIGTERM, then stops its JVM and removes its storage.',
  )
  parser.add_argument('--http_port', type=int, default=None, help='WebHDFS port (default: a free one)')
  args = parser.parse_args(argv)
  workdir = tempfile.mkdtemp(prefix='hdfs_')
  try:
    with stopped_by_signals(), hdfs_cluster(workdir, http_port=args.http_port) as hdfs:
      print(' '.join(hdfs.beam_args), flush=True)
      serve_until_stopped()
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
  sys.exit(main())
