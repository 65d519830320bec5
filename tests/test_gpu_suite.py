"""benchmarks/gpu_suite.sh, the one prepared accelerator check, at its tiny
CPU sizes (GPU_SUITE_TINY=1): a session that is lent a GPU has minutes to run
it, so each of its three parts must already work here."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_gpu_suite_runs_every_part_at_tiny_sizes_on_cpu():
  env = {**os.environ, 'GPU_SUITE_TINY': '1', 'PYTHON': sys.executable}
  done = subprocess.run(
    ['bash', 'benchmarks/gpu_suite.sh'], cwd=REPO, env=env, capture_output=True, text=True, timeout=380
  )
  out = done.stdout + done.stderr
  assert done.returncode == 0, out[-4000:]
  assert 'failed' not in out, out[-4000:]
  # 1. RunInference vs the raw loop: both rates, every image through the pipeline.
  assert re.search(r'run 1: raw loop +[\d.]+ img/s \| RunInference end to end +[\d.]+ img/s', out), out[-4000:]
  assert not re.search(r'steady state +-', out), out[-4000:]  # a negative rate is a measuring fault
  # 2. The trainer's step: a rate.
  assert re.search(r'train step: resnet_tiny .*: [\d,]+ images/s', out), out[-4000:]
  # 3. The flagship pipeline vs its loop: same predictions, nothing lost.
  flagship = re.search(r'single pipeline .*\| predictions (\d+) \+ (\d+) dead letters, match the loop: (\w+)', out)
  assert flagship and flagship.group(1) == '1200' and flagship.group(2) == '0' and flagship.group(3) == 'True', out[
    -4000:
  ]
