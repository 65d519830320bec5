"""Large local jobs in input shards (beam_dl.operations.local_shards): the plan, and a
real classify_images job that fails in a shard, is rerun, and ends with the
outputs of one unsharded run, every input once."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from beam_dl.cli.options import OptionsError
from beam_dl.formats.jsonl import read_jsonl
from beam_dl.io import files as files_lib
from beam_dl.operations import local_shards
from pipelines import classify_images
from tests.imaging import TEXT_NAMED_JPG, digits_uint8, encode, truncated_jpeg


def test_plan_is_consecutive_in_input_order_and_covers_every_path_once():
  paths = [f'/in/{i:03d}.png' for i in range(7)]
  assert list(local_shards.plan_shards(iter(paths), 3)) == [paths[0:3], paths[3:6], paths[6:]]
  with pytest.raises(OptionsError, match='at least 1'):
    list(local_shards.plan_shards(paths, 0))


def test_shard_argv_replaces_input_and_output_keeps_the_rest():
  argv = [
    '--input',
    'a/*',
    '--shard_files=5',
    '--model_dir=m',
    '--output=o/p',
    '--input_format',
    'files',
    '--shard_files',
    '7',
    '--max_batch_size',
    '4',
  ]
  assert local_shards.shard_argv(argv, '@list.txt', 'o/p/shard-00000.partial/p', ['--x=1']) == [
    '--model_dir=m',
    '--input_format',
    'files',
    '--max_batch_size',
    '4',
    '--x=1',
    '--input=@list.txt',
    '--output=o/p/shard-00000.partial/p',
  ]


def test_inputs_are_what_the_match_lists_and_skips_in_a_fixed_order(tmp_path):
  for folder in ('b', 'a', 'a/z'):
    (tmp_path / folder).mkdir()
  for name in ('b/2.png', 'b/1.png', 'a/3.png', 'a/z/4.png', 'a/skip.txt'):
    (tmp_path / name).write_bytes(b'x')
  (tmp_path / 'a' / 'dir.png').mkdir()
  os.symlink(tmp_path / 'gone', tmp_path / 'b' / 'dangling.png')
  pattern = f'{tmp_path}/*/*.png'
  listed = list(files_lib.iter_inputs(pattern))
  matched = [m.path for m in files_lib.FileSystems.match([pattern])[0].metadata_list]
  unlisted = [path for path, _ in files_lib.unlisted_entries(pattern)]
  assert sorted(listed) == sorted(matched + unlisted) and len(set(listed)) == len(listed)
  assert listed == [f'{tmp_path}/{n}' for n in ('a/3.png', 'a/dir.png', 'b/1.png', 'b/2.png', 'b/dangling.png')]
  assert list(files_lib.iter_inputs(pattern)) == listed  # the same order every time
  file_list = files_lib.write_file_list(str(tmp_path / 'list.txt'), listed)
  assert file_list == f'@{tmp_path}/list.txt' and list(files_lib.iter_inputs(file_list)) == listed
  assert (
    files_lib.listed_metadata(listed[0]).path == listed[0] and files_lib.listed_metadata(listed[0]).size_in_bytes == 1
  )
  assert 'a directory' in files_lib.listed_metadata(listed[1])
  assert 'dangling symlink' in files_lib.listed_metadata(listed[4])


def _write_inputs(folder) -> list[str]:
  """22 real inputs: 16 digit images (PNG/JPEG) and 6 that fail (bad bytes,
  a directory and a dangling symlink matching the glob)."""
  images, _ = digits_uint8()
  folder.mkdir()
  for i, image in enumerate(images[:16]):
    fmt = 'PNG' if i % 2 else 'JPEG'
    (folder / f'{i:02d}.{fmt.lower()}').write_bytes(encode(image, fmt, **({'quality': 95} if i % 2 == 0 else {})))
  (folder / '20.jpg').write_bytes(truncated_jpeg())
  (folder / '21.jpg').write_bytes(TEXT_NAMED_JPG)
  (folder / '22.png').write_bytes(b'')
  (folder / '23.png').write_bytes(b'\x89PNG not really')
  (folder / '24.dir').mkdir()
  os.symlink(folder / 'nowhere.png', folder / '25.png')
  return sorted(str(p) for p in folder.iterdir())


def _records(prefix_glob: str) -> tuple[list, list]:
  key = lambda r: json.dumps(r, sort_keys=True)
  return (
    sorted(read_jsonl(f'{prefix_glob}-[0-9]*-of-*.jsonl'), key=key),
    sorted(read_jsonl(f'{prefix_glob}_failed-*.jsonl'), key=key),
  )


class _ShardFails(Exception):
  pass


def _kill_when_shard_1_runs(argv: list[str], job) -> None:
  """Runs the sharded job as a command and SIGKILLs it while shard 1 runs."""
  proc = subprocess.Popen(
    [sys.executable, '-m', 'pipelines.classify_images', *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  try:
    deadline = time.monotonic() + 600
    while not (job / 'shard-00001.partial').exists():
      assert proc.poll() is None and time.monotonic() < deadline, 'the job ended before shard 1 started'
      time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()


@pytest.mark.slow  # eight pipeline runs
def test_killed_job_rerun_gives_the_unsharded_outputs_every_input_once(digits_model_dir, tmp_path):
  paths = _write_inputs(tmp_path / 'in')
  common = [f'--input={tmp_path}/in/*', f'--model_dir={digits_model_dir}', '--max_batch_size=4']
  classify_images.run([*common, f'--output={tmp_path}/whole/pred'])
  expected = _records(f'{tmp_path}/whole/pred')
  assert len(expected[0]) == 16 and len(expected[1]) == 6

  # A shard's run that raises after writing its outputs (a crash before the
  # commit), in this process.
  job = tmp_path / 'job' / 'pred'
  argv = [*common, f'--output={job}', '--shard_files=8']
  calls = []

  def crash_in_shard_1(shard_argv):
    calls.append(shard_argv)
    classify_images.run(shard_argv)
    if len(calls) == 2:
      raise _ShardFails('killed after writing, before the commit')

  options = classify_images.cli.parse_options(argv, classify_images.OPTION_GROUPS, prog='t', description='')
  with pytest.raises(_ShardFails):
    local_shards.run_in_shards(crash_in_shard_1, argv, options, 'classify_images', ['--input_format=files'])
  assert sorted(os.listdir(job)) == ['inputs', 'shard-00000', 'shard-00001.partial', 'shards.json']
  assert os.listdir(job / 'shard-00001.partial')  # its outputs were written, not committed

  # The command itself (a process per shard) killed with SIGKILL while shard 1 runs.
  shutil.rmtree(job / 'shard-00000')  # back to a planned job with no shard done
  shutil.rmtree(job / 'shard-00001.partial')
  _kill_when_shard_1_runs(argv, job)
  assert not (job / 'shard-00002').exists() and not (job / 'summary.json').exists()

  # Rerun the same command: shard 0 is skipped, 1 redone from nothing, 2 run.
  summary = classify_images.run(argv)
  assert (summary.shards, summary.ran, summary.skipped) == (3, 2, 1)
  assert (summary.inputs, summary.outputs, summary.dead_letters) == (22, 16, 6)
  assert sorted(os.listdir(job)) == [
    'inputs',
    'shard-00000',
    'shard-00001',
    'shard-00002',
    'shards.json',
    'summary.json',
  ]
  predictions, failed = _records(f'{job}/shard-*/pred')
  keys = [r['key'] for r in predictions + failed]
  assert sorted(keys) == paths  # every input once, over all shards
  assert (predictions, failed) == expected  # the unsharded run's records

  # A finished job reruns as a no-op; another shard size is refused.
  again = classify_images.run(argv)
  assert (again.ran, again.skipped, again.outputs) == (0, 3, 16)
  with pytest.raises(OptionsError, match='shard_files'):
    classify_images.run([*common, f'--output={job}', '--shard_files=5'])
