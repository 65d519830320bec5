"""Train a Flax model from a config file: `python -m pipelines.train`.

    python -m pipelines.train --config pipelines/configs/digits_cnn.py:runlocal \
        --workdir /tmp/digits

`--config PATH[:VARIANT]` names a python file whose `get_config(variant)`
returns a `beam_dl.training.TrainConfig`; if the file also defines
`prepare(config, data_dir)`, it is called first to write the example data
set (TFRecords in the shared format) and may return an updated config.
`--set key=value` overrides fields (dotted for nested, values parsed as
python literals), e.g. `--set num_steps=50 --set sharding.mode=fsdp`.

The run resumes from `WORKDIR/checkpoints` if present, logs step rate / ETA
/ input wait, evaluates, and exports the served model to `WORKDIR/model`
(`beam_dl.models.checkpoints`); the summary is printed and written to
`WORKDIR/summary.json`. TensorBoard summaries (loss, metrics, learning rate,
throughput) go to `WORKDIR/tensorboard` (`--tensorboard_dir`, `none` for
none); `--plot curves.png` also draws them to a PNG at the end.

With `--mlflow_tracking_uri` (or `--mlflow_model_name`) the run is also
logged to MLflow: config as params, loss/metric curves, the exported model
directory as the `model` artifact, registered as the next version of
`--mlflow_model_name` with each `--mlflow_alias` pointed at it
(`beam_dl.operations.registry_mlflow`). Without a server, a local store works:
`--mlflow_tracking_uri sqlite:///mlflow.db`.

Multi-process (one process per host, or several on one machine): each
process runs this same command with JAX_COORDINATOR_ADDRESS (host:port of
process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID set (SLURM and Open MPI
jobs are detected without them); `--processes N` starts N such processes on
this machine. Every log line names its process; process 0 alone writes the
summary, TensorBoard, the exported model and the MLflow run; checkpoints
are written by all. See docs/training.md.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import logging
import numbers
import os
import sys


def load_config_module(path: str):
  """Imports a config file by path (configs are files, not a package)."""
  name = 'beam_dl_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f'config file not found: {path}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def apply_override(config, assignment: str):
  """Returns `config` with one dotted `key=value` assignment applied."""
  key, sep, raw = assignment.partition('=')
  if not sep:
    raise ValueError(f'--set expects key=value, got {assignment!r}')
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw  # bare strings: --set sharding.mode=fsdp
  head, _, rest = key.partition('.')
  if not hasattr(config, head):
    raise ValueError(f'unknown config field {head!r}')
  current = getattr(config, head)
  if not rest and not _same_kind(current, value):
    raise ValueError(f'{key} takes a {type(current).__name__} (now {current!r}), got {raw!r}')
  if rest:
    if isinstance(current, dict):
      return dataclasses.replace(config, **{head: {**current, rest: value}})
    return dataclasses.replace(config, **{head: apply_override(current, f'{rest}={raw}')})
  return dataclasses.replace(config, **{head: value})


def _same_kind(current, value) -> bool:
  """Whether `value` may replace a config field holding `current`: any value
  for an unset (None) field, else one of its kind (a number for a number, a
  list for a tuple), so a typo fails here and not in the middle of training."""
  if current is None:
    return True
  if isinstance(current, bool) or isinstance(value, bool):
    return isinstance(current, bool) and isinstance(value, bool)
  if isinstance(current, numbers.Real):
    return isinstance(value, numbers.Real)
  if isinstance(current, (list, tuple)):
    return isinstance(value, (list, tuple))
  return isinstance(value, type(current))


def resolve_config(spec: str, data_dir: str, overrides=()):
  """The config `--config PATH[:VARIANT]` names, with `--set` overrides
  applied, after its `prepare()`; a variant or an override that does not
  fit is an OptionsError."""
  from beam_dl.cli.options import OptionsError

  path, _, variant = spec.partition(':')
  module = load_config_module(path)
  if not hasattr(module, 'get_config'):
    raise OptionsError(f'--config {path}: defines no get_config(variant)')
  try:
    config = module.get_config(variant or None)
  except ValueError as e:  # an unknown variant
    raise OptionsError(f'--config {spec}: {e}') from None
  for assignment in overrides:
    try:
      config = apply_override(config, assignment)
    except ValueError as e:
      raise OptionsError(f'--set {assignment}: {e}') from None
  if hasattr(module, 'prepare'):
    config = module.prepare(config, data_dir) or config
  return config


def parse_args(argv=None):
  from beam_dl import cli
  from beam_dl.cli.options import positive_int

  parser = cli.ArgumentParser(prog='python -m pipelines.train', description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='path/to/config.py[:variant]')
  parser.add_argument('--workdir', required=True, help='checkpoints, exported model, summary')
  parser.add_argument('--data_dir', default=None, help='where prepare() writes data (default WORKDIR/data)')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='override a config field')
  parser.add_argument(
    '--tensorboard_dir',
    default='tensorboard',
    help="TensorBoard summaries, relative to WORKDIR (default tensorboard; 'none': off)",
  )
  parser.add_argument('--plot', default=None, metavar='PNG', help='write a PNG of the training curves at the end')
  parser.add_argument('--log_level', default='INFO', choices=['DEBUG', 'INFO', 'WARNING', 'ERROR'])
  parser.add_argument(
    '--cpu_devices',
    type=positive_int,
    default=None,
    metavar='N',
    help='on CPU, split the host into N XLA devices (for model-parallel configs such as digits_cnn.py:tensor)',
  )
  parser.add_argument(
    '--processes',
    type=positive_int,
    default=1,
    metavar='N',
    help='run as N JAX processes on this machine (a local multi-host run; see docs/training.md)',
  )
  parser.add_argument(
    '--mlflow_tracking_uri',
    default=None,
    help='log the run to MLflow here (http://host:port, sqlite:///mlflow.db; default MLFLOW_TRACKING_URI)',
  )
  parser.add_argument('--mlflow_model_name', default=None, help='register the exported model under this name')
  parser.add_argument('--mlflow_alias', action='append', default=[], help='point this alias at the new version')
  parser.add_argument('--mlflow_experiment', default=None, help='MLflow experiment name (default: Default)')
  return parser.parse_args(argv)


def log_to_mlflow(args, config, summary) -> dict:
  """Logs the finished run to MLflow; returns {'run_id', 'model_uri'}."""
  from beam_dl.operations import registry_mlflow

  registered = registry_mlflow.log_training_run(
    summary['model_dir'],
    params={'config': dataclasses.asdict(config), 'config_file': args.config},
    history=summary.get('history', ()),
    eval_history=summary.get('eval_history', ()),
    summary={k: v for k, v in summary.items() if k in ('wall_s', 'compile_s', 'steps_per_s', 'examples_per_s')},
    model_name=args.mlflow_model_name,
    aliases=args.mlflow_alias,
    experiment=args.mlflow_experiment,
    tracking_uri=args.mlflow_tracking_uri,
  )
  logging.info('MLflow run %s; model %s', registered.run_id, registered.uri)
  return {'run_id': registered.run_id, 'model_uri': registered.uri}


def _without_processes(argv):
  """argv minus its --processes flag: what each launched process runs."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg == '--processes':
      skip = True
    elif not arg.startswith('--processes='):
      out.append(arg)
  return out


def launch(args, argv) -> int:
  """Runs this command as `args.processes` JAX processes on this machine."""
  from beam_dl.training import launch as launch_lib

  logging.info('launching %d processes', args.processes)
  return launch_lib.launch_local(
    launch_lib.main_module_command('pipelines.train', _without_processes(argv)), args.processes
  )


def setup_logging(level: str) -> None:
  """Log lines carry `[process i/n]` in a multi-process run."""
  import jax

  if jax.process_count() > 1:
    tag = f'[process {jax.process_index()}/{jax.process_count()}]'
    logging.basicConfig(level=level, format=f'%(asctime)s {tag} %(levelname)s %(message)s', force=True)
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax is chatty at INFO


def prepared_config(args):
  """The config, its data prepared by process 0 while the others wait."""
  import jax

  data_dir = args.data_dir or os.path.join(args.workdir, 'data')
  if jax.process_count() == 1:
    return resolve_config(args.config, data_dir, args.set)
  from jax.experimental import multihost_utils

  config = resolve_config(args.config, data_dir, args.set) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices('pipelines.train: data prepared')
  return config or resolve_config(args.config, data_dir, args.set)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  logging.basicConfig(level=args.log_level, format='%(asctime)s %(levelname)s %(message)s')
  if args.processes > 1 and 'JAX_PROCESS_ID' not in os.environ:
    raise SystemExit(launch(args, argv))
  if args.cpu_devices:  # read by XLA when jax initialises its backends: before the import
    os.environ['XLA_FLAGS'] = (
      f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={args.cpu_devices}'
    ).strip()
  import jax  # heavy imports after arg parsing

  from beam_dl import cli
  from beam_dl.training import train_and_evaluate
  from beam_dl.training.sharding import maybe_initialize_distributed

  cli.require_writable(args.workdir, 'workdir', directory=True)
  maybe_initialize_distributed()
  setup_logging(args.log_level)
  config = prepared_config(args)
  tensorboard = None if args.tensorboard_dir.lower() == 'none' else args.tensorboard_dir
  try:
    summary = train_and_evaluate(config, args.workdir, summary_dir=tensorboard)
  except ValueError as e:
    if 'sharding.' not in str(e):
      raise
    print(f'train: error: {e}', file=sys.stderr)  # a config that cannot run here: one line
    raise SystemExit(2) from None
  if (args.mlflow_tracking_uri or args.mlflow_model_name) and jax.process_index() == 0:
    summary['mlflow'] = log_to_mlflow(args, config, summary)
  summary.pop('history', None)
  if jax.process_count() > 1:
    # Leave the cluster here, where every process has finished, rather than
    # at interpreter exit: teardown takes longer on some processes than
    # others, and the exit barrier would time out waiting for them.
    jax.distributed.shutdown()
  if jax.process_index() != 0:  # process 0 reports the run
    return summary
  if args.plot and summary.get('tensorboard_dir'):
    from beam_dl.training.summaries import plot_curves

    summary['plot'] = plot_curves(summary['tensorboard_dir'], args.plot)
  json.dump(summary, sys.stdout, indent=2, default=str)
  print()
  return summary


if __name__ == '__main__':
  from beam_dl import cli

  cli.main(main, 'train', logs=False)
