"""The pipelines' command-line contract: --help, unknown flags, empty globs, exit codes."""

import contextlib
import io

import pytest

from beam_dl import cli
from beam_dl.cli.options import InferenceOptions, IOOptions, OptionsError

GROUPS = [IOOptions, InferenceOptions]


def test_help_lists_the_pipelines_own_flags_and_exits_0():
  out = io.StringIO()
  with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
    cli.parse_options(['--input', 'x', '--help'], GROUPS, prog='python -m pipelines.x', description='Does x.')
  assert exit_info.value.code == 0
  text = out.getvalue()
  for flag in ('--input', '--output', '--model_dir', '--max_batch_size', '--precision'):
    assert flag in text
  assert 'Does x.' in text and '--runner' in text


def test_misspelled_flag_is_refused_with_a_suggestion():
  with pytest.raises(OptionsError, match=r'--modle_dir \(did you mean --model_dir\?\)'):
    cli.parse_options(['--input', 'x', '--modle_dir', 'm'], GROUPS, prog='p', description='d')


def test_beam_flags_and_own_flags_parse():
  options = cli.parse_options(
    ['--input=x', '--model_dir', 'm', '--runner', 'DirectRunner', '--direct_num_workers=2'],
    GROUPS,
    prog='p',
    description='d',
  )
  values = options.get_all_options()
  assert (values['input'], values['model_dir'], values['direct_num_workers']) == ('x', 'm', 2)


def test_require_matches_accepts_a_glob_with_matches_and_refuses_an_empty_glob(tmp_path):
  (tmp_path / 'a.png').write_bytes(b'x')
  (tmp_path / 'b.png').write_bytes(b'y')
  cli.require_matches(str(tmp_path / '*.png'))
  cli.require_matches(str(tmp_path / 'b.png'))
  with pytest.raises(OptionsError, match='matches no file'):
    cli.require_matches(str(tmp_path / '*.jpg'))


def test_main_turns_an_options_error_into_one_line_and_exit_2(capsys):
  def run(argv):
    raise OptionsError(f'--input {argv[1]!r} matches no file')

  with pytest.raises(SystemExit) as exit_info:
    cli.main(run, 'classify_images', ['--input', 'nothing/*'])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip() == "classify_images: error: --input 'nothing/*' matches no file"


def test_main_reports_registry_errors_and_missing_files_on_one_line(capsys):
  from beam_dl.operations.registry_mlflow import RegistryError

  for error in (
    RegistryError('models:/digits@nope: API request failed\n  Caused by: refused'),
    FileNotFoundError(2, 'No such file or directory', '/no/config.py'),
  ):

    def run(argv, error=error):
      raise error

    with pytest.raises(SystemExit) as exit_info:
      cli.main(run, 'train', [], logs=False)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith('train: error: ') and ('Caused by: refused' in line or '/no/config.py' in line)


def test_a_bug_is_not_a_user_error():
  def run(argv):
    raise KeyError('a bug keeps its traceback')

  with pytest.raises(KeyError):
    cli.main(run, 'classify_images', [], logs=False)


def test_argument_parser_errors_are_options_errors():
  parser = cli.ArgumentParser(prog='p')
  parser.add_argument('--workdir', required=True)
  with pytest.raises(OptionsError, match='required: --workdir'):
    parser.parse_args([])
  with pytest.raises(OptionsError, match='--max_batch_size: expected a positive integer'):
    cli.check_known_flags(['--max_batch_size', '0'])


def test_require_writable_makes_the_directory_and_refuses_a_file_in_the_way(tmp_path):
  cli.require_writable(str(tmp_path / 'new' / 'pred'))
  assert (tmp_path / 'new').is_dir()
  cli.require_writable(str(tmp_path / 'workdir'), 'workdir', directory=True)
  assert (tmp_path / 'workdir').is_dir()
  (tmp_path / 'a_file').write_text('x')
  with pytest.raises(OptionsError, match='--output .*cannot make the directory'):
    cli.require_writable(str(tmp_path / 'a_file' / 'pred'))
  cli.require_writable('gs://bucket/out/pred')  # other filesystems: the job's to check


def _train(tmp_path, *extra):
  """`pipelines.train` on the digits config's `tensor` variant (2-way model
  parallel) in a fresh process with one CPU device unless told otherwise."""
  import os
  import subprocess
  import sys

  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # conftest sets 8 devices
  cmd = [
    sys.executable,
    '-m',
    'pipelines.train',
    '--config',
    'pipelines/configs/digits_cnn.py:tensor',
    '--workdir',
    str(tmp_path / 'work'),
    '--tensorboard_dir',
    'none',
    '--set',
    'num_steps=3',
    '--set',
    'eval_every=0',
    '--set',
    'checkpoint_every=0',
    '--set',
    'log_every=1',
    *extra,
  ]
  return subprocess.run(
    cmd,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )


@pytest.mark.slow
def test_model_parallel_config_on_one_cpu_says_how_to_run_it_and_runs_with_cpu_devices(tmp_path):
  refused = _train(tmp_path)
  assert refused.returncode == 2, refused.stderr[-2000:]
  last = refused.stderr.strip().splitlines()[-1]
  assert last.startswith('train: error: sharding.model_parallelism=2 needs a multiple of 2 devices')
  assert '--cpu_devices 2' in last

  ran = _train(tmp_path, '--cpu_devices', '2')
  assert ran.returncode == 0, ran.stderr[-2000:]
  import json

  summary = json.loads(ran.stdout[ran.stdout.index('{') :])
  # 2 devices: a data axis of 1 ('devices' counts data-parallel replicas) x a model axis of 2
  assert (summary['devices'], summary['sharding']['model_parallelism'], summary['steps']) == (1, 2, 3)


def test_the_state_cache_is_on_unless_the_command_line_sizes_it():
  def cache_mb(*argv):
    return cli.parse_options(list(argv), GROUPS, prog='p', description='d').get_all_options()[
      'max_cache_memory_usage_mb'
    ]

  assert cache_mb('--input=x') == cli.STATE_CACHE_MB > 0
  assert cache_mb('--input=x', '--max_cache_memory_usage_mb=0') == 0
  assert cache_mb('--input=x', '--max_cache_memory_usage_mb', '7') == 7
