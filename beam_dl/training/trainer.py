"""`train_and_evaluate(config, workdir)`: the training loop.

Builds the sharding strategy, restores the latest orbax checkpoint if there
is one (a killed run resumes where its last checkpoint left off and, because
batch k and the dropout key of step k depend only on the seed, ends exactly
where an uninterrupted run ends), streams batches from the tf.data pipeline
to the devices, logs step rate / ETA / input wait, evaluates, checkpoints,
and finally exports the model for serving with `beam_dl.models.checkpoints.save`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np

import beam_dl.models  # noqa: F401  (before checkpoints: registers models)
import beam_dl.models.checkpoints as checkpoints
from beam_dl.training import checkpointing, input_pipeline, losses
from beam_dl.training.config import TrainConfig
from beam_dl.training.sharding import maybe_initialize_distributed
from beam_dl.training.state import make_schedule
from beam_dl.training.strategies import make_strategy
from beam_dl.training.summaries import SummaryWriter

log = logging.getLogger(__name__)

MODEL_DIR = 'model'
QUANTIZED_MODEL_DIR = 'model_int8'  # with compression.qat
CHECKPOINT_DIR = 'checkpoints'
SUMMARY_FILE = 'summary.json'
TENSORBOARD_DIR = 'tensorboard'

# hook(step, state, metrics) runs after every step; metrics are host floats
# on logging steps and None otherwise. Tests use it to simulate a crash.
Hook = Callable[[int, Any, dict | None], None]


def _local_batch(global_batch: int, data_size: int) -> int:
  if global_batch % data_size:
    raise ValueError(f'batch size {global_batch} is not divisible by {data_size} data shards')
  if global_batch % jax.process_count():
    raise ValueError(f'batch size {global_batch} is not divisible by {jax.process_count()} processes')
  return global_batch // jax.process_count()


def model_spec(cfg: TrainConfig, metrics: dict | None = None) -> checkpoints.ModelSpec:
  """The serving spec: registry name + kwargs + how inputs are fed."""
  sequence = cfg.data.is_sequence
  task = cfg.task if not sequence else f'sequence_{cfg.task}'
  return checkpoints.ModelSpec(
    name=cfg.model,
    kwargs=dict(cfg.model_kwargs),
    input_shape=(None, int(cfg.data.shape[-1])) if sequence else tuple(int(d) for d in cfg.data.shape),
    # Sequence values and tf.Transform outputs are float32 on disk.
    input_dtype='float32' if sequence or cfg.data.kind == 'transformed' else cfg.input_dtype,
    input_scale=cfg.input_scale,
    input_offset=cfg.input_offset,
    labels=list(cfg.labels) if cfg.labels else None,
    task=task,
    extra={'config': _jsonable(cfg.to_dict()), 'metrics': metrics or {}},
  )


def load_init_variables(cfg: TrainConfig) -> dict:
  """The variables of `cfg.init_dir` (a trained float model of the same
  architecture) to start from. Raises ValueError when the dir is quantized,
  was trained on differently scaled inputs, or its variables do not fit
  `cfg`'s model (each difference named) -- before anything is built."""
  spec, variables = checkpoints.load(cfg.init_dir)
  if spec.quantization:
    raise ValueError(
      f'init_dir {cfg.init_dir}: a quantized model dir ({dict(spec.quantization)}); '
      'start from the float model (QAT: compression.qat)'
    )
  if (spec.input_scale, spec.input_offset) != (cfg.input_scale, cfg.input_offset):
    raise ValueError(
      f'init_dir {cfg.init_dir}: trained on inputs * {spec.input_scale} + {spec.input_offset}, '
      f'this config feeds inputs * {cfg.input_scale} + {cfg.input_offset}'
    )
  problems = checkpoints.variable_mismatches(model_spec(cfg), variables)
  if problems:
    raise ValueError(
      f'init_dir {cfg.init_dir} ({spec.name}) does not fit {cfg.model}{dict(cfg.model_kwargs)}: '
      + '; '.join(problems[:5])
      + (f'; and {len(problems) - 5} more' if len(problems) > 5 else '')
    )
  return variables


def start_from(state, variables: dict):
  """`state` with its params and batch stats replaced by `variables`', each
  array placed like the one it replaces (sharded, or replicated for pmap).
  The optimizer state stays fresh."""

  def place(current, saved):
    saved = np.broadcast_to(np.asarray(saved, current.dtype), current.shape)  # pmap: one copy per device
    return jax.device_put(saved, current.sharding)

  return state.replace(
    params=jax.tree_util.tree_map(place, state.params, variables['params']),
    batch_stats=jax.tree_util.tree_map(place, state.batch_stats, variables.get('batch_stats', {})),
  )


def _jsonable(obj):
  return json.loads(json.dumps(obj, default=str))


def evaluate(cfg: TrainConfig, strategy, state) -> dict:
  """One pass over the eval files; padded examples carry weight 0."""
  batch_size = _local_batch(cfg.eval_batch_size, strategy.data_size)
  ds = input_pipeline.make_dataset(
    cfg.data,
    cfg.data.eval_files,
    batch_size,
    train=False,
    use_ids=bool(cfg.model_kwargs.get('vocab_size')),
  )
  totals = None
  for batch in _in_step(ds):
    sums = strategy.eval_sums(state, strategy.put(input_pipeline.pad_batch(batch, batch_size)))
    totals = sums if totals is None else jax.tree_util.tree_map(lambda a, b: a + b, totals, sums)
  return losses.finalize(jax.device_get(totals)) if totals is not None else {}


def _in_step(ds):
  """The batches of a finite tf.data pass, kept in step across processes.

  Each eval step is a collective, so every process must run as many: while
  any process still has a batch, one that has run out contributes an empty
  batch (padded to weight 0). One process: the batches as they come.
  """
  if jax.process_count() == 1:
    yield from ds.as_numpy_iterator()
    return
  from jax.experimental import multihost_utils

  empty = {
    k: np.zeros([0] + [d or 0 for d in spec.shape[1:]], spec.dtype.as_numpy_dtype)
    for k, spec in ds.element_spec.items()
  }
  for batch in itertools.chain(ds.as_numpy_iterator(), itertools.repeat(None)):
    if not multihost_utils.process_allgather(np.int32(batch is not None)).any():
      return
    yield empty if batch is None else batch


def train_and_evaluate(
  cfg: TrainConfig, workdir: str, *, hooks: Iterable[Hook] = (), devices=None, summary_dir: str | None = TENSORBOARD_DIR
) -> dict:
  """Trains `cfg` in `workdir` (resuming if it holds checkpoints); returns the summary.

  TensorBoard summaries (train loss and metrics, learning rate, steps/s,
  examples/s, input wait; eval metrics) go to `summary_dir` (relative to
  `workdir`; None: none), written by process 0.
  """
  maybe_initialize_distributed()
  c = cfg.compression
  if c.teacher_dir and c.distill_mixup and c.distill_weight != 1.0:
    raise ValueError(
      f'compression.distill_mixup needs distill_weight=1 (blended inputs have no labels), got {c.distill_weight}'
    )
  init_variables = load_init_variables(cfg) if cfg.init_dir else None
  os.makedirs(workdir, exist_ok=True)
  writer = (
    SummaryWriter(os.path.join(workdir, summary_dir)) if summary_dir is not None and jax.process_index() == 0 else None
  )
  schedule = make_schedule(cfg)
  strategy = make_strategy(cfg, devices)
  local_batch = _local_batch(cfg.batch_size, strategy.data_size)
  mngr = checkpointing.manager(
    os.path.join(workdir, CHECKPOINT_DIR),
    every=cfg.checkpoint_every or cfg.num_steps,
    keep=cfg.keep_checkpoints,
  )
  restored = checkpointing.restore_latest(mngr, strategy.restore_target())
  if restored is not None:
    state = strategy.from_checkpoint(restored)
    start = int(restored.step)
    log.info('resumed from checkpoint at step %d', start)
  else:
    state, start = strategy.create_state(), 0
    if init_variables is not None:
      state = start_from(state, init_variables)
      log.info('started from the params of %s', cfg.init_dir)
  if hasattr(strategy, 'shard_shapes') and start == 0:
    log.debug('state shard shapes: %s', strategy.shard_shapes())

  ds = input_pipeline.make_dataset(
    cfg.data,
    cfg.data.train_files,
    local_batch,
    train=True,
    seed=cfg.seed,
    skip_batches=start,
    use_ids=bool(cfg.model_kwargs.get('vocab_size')),
  )
  host_batches = ds.as_numpy_iterator()
  if cfg.compression.teacher_dir:
    from beam_dl.compression import distill

    teacher = distill.Teacher(c.teacher_dir, mixup=c.distill_mixup, seed=cfg.seed, start=start)
    log.info('distilling from %s (%.2f MB of variables)', teacher.model_dir, teacher.num_bytes / 1e6)
    host_batches = map(teacher.add_outputs, host_batches)
  batches = input_pipeline.prefetch_to_mesh(host_batches, strategy.put, cfg.data.prefetch)
  hooks = list(hooks)
  history, pending, evals = [], [], []
  t_start = time.perf_counter()
  t_steady, steady_from = None, start  # rates exclude the first (compiling) step
  wait = 0.0
  step = start
  try:
    while step < cfg.num_steps:
      t0 = time.perf_counter()
      batch = next(batches)
      wait += time.perf_counter() - t0
      state, metrics = strategy.train_step(state, batch)
      pending.append(metrics)
      step += 1
      if t_steady is None:
        jax.block_until_ready(metrics)
        t_steady, steady_from, wait = time.perf_counter(), step, 0.0
        log.info('first step (compilation included) took %.1fs', t_steady - t_start)
      host = None
      if step % max(cfg.log_every, 1) == 0 or step == cfg.num_steps:
        host = _mean(jax.device_get(pending))
        pending = []
        now = time.perf_counter()
        rate = (step - steady_from) / max(now - t_steady, 1e-9)
        history.append({'step': step, **host})
        if writer is not None:
          writer.scalars(
            'train',
            step,
            {
              **host,
              'learning_rate': float(schedule(max(step - 1, 0) // max(cfg.grad_accum_steps, 1))),
              'steps_per_sec': rate,
              'examples_per_sec': rate * cfg.batch_size,
              'input_wait_fraction': wait / max(now - t_steady, 1e-9),
            },
          )
        log.info(
          'step %d/%d  %s  %.1f steps/s  %.0f ex/s  input wait %.0f%%  ETA %.0fs',
          step,
          cfg.num_steps,
          _fmt(host),
          rate,
          rate * cfg.batch_size,
          100 * wait / max(now - t_steady, 1e-9),
          (cfg.num_steps - step) / max(rate, 1e-9),
        )
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
        ev = evaluate(cfg, strategy, state)
        evals.append({'step': step, **ev})
        if writer is not None:
          writer.scalars('eval', step, ev)
        log.info('eval at step %d: %s', step, _fmt(ev))
      checkpointing.save(mngr, step, strategy.to_checkpoint(state))
      for hook in hooks:
        hook(step, state, host)
    if mngr.latest_step() != step:
      checkpointing.save(mngr, step, strategy.to_checkpoint(state), force=True)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    if writer is not None:
      writer.flush()
  wall = time.perf_counter() - t_start
  steady = time.perf_counter() - t_steady if t_steady is not None else 0.0
  steady_steps = step - steady_from
  final_eval = evaluate(cfg, strategy, state) if cfg.data.eval_files else {}
  evals.append({'step': step, **final_eval})
  if writer is not None:
    writer.scalars('eval', step, final_eval)
    writer.close()
  log.info('final eval at step %d: %s', step, _fmt(final_eval))
  model_dir = os.path.join(workdir, MODEL_DIR)
  variables = strategy.host_variables(state)
  compressed = {}
  if cfg.compression.prune_sparsity:
    from beam_dl.compression import pruning

    compressed['pruning'] = pruning.sparsity_report(variables['params'], cfg.compression.prune_exclude)
    log.info('sparsity reached: %.4f (target %.4f)', compressed['pruning']['sparsity'], cfg.compression.prune_sparsity)
  if jax.process_index() == 0:
    spec = model_spec(cfg, {**final_eval, **compressed})
    checkpoints.save(model_dir, spec, variables)
    _save_input_profile(cfg, model_dir)
    if cfg.compression.qat:
      compressed['quantized_model_dir'] = _export_quantized(cfg, spec, variables, workdir)
  steps_run = step - start
  summary = {
    'steps': step,
    'resumed_from': start,
    'train': history[-1] if history else {},
    'eval': final_eval,
    'eval_history': evals,
    'wall_s': round(wall, 3),
    'compile_s': round(wall - steady, 3),
    'steps_per_s': round(steady_steps / steady, 3) if steady_steps and steady else None,
    'examples_per_s': round(steady_steps * cfg.batch_size / steady, 1) if steady_steps and steady else None,
    'input_wait_fraction': round(wait / steady, 4) if steady else None,
    'model_dir': model_dir,
    'sharding': dataclasses.asdict(cfg.sharding),
    'devices': strategy.data_size,
    'tensorboard_dir': writer.logdir if writer is not None else None,
    **compressed,
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, SUMMARY_FILE), 'w') as f:
      json.dump(_jsonable(summary), f, indent=2)
  log.info(
    'done: %d steps in %.1fs (%.1f steps/s after compilation); eval %s; model at %s',
    steps_run,
    wall,
    summary['steps_per_s'] or 0,
    _fmt(final_eval),
    model_dir,
  )
  summary['history'] = history
  return summary


PROFILE_EXAMPLES = 2048


def _save_input_profile(cfg: TrainConfig, model_dir: str) -> None:
  """The profile of up to PROFILE_EXAMPLES training inputs (raw, before
  `input_scale`) in the model directory, which serving compares its inputs
  with by default (`transforms.drift`). Image models: brightness and
  contrast (`drift.input_profile`); sequence models: one feature per input
  channel, `input/<i>`, which score_sequences reads as its i-th
  `--event_value_fields` field (`drift.sequence_input_profile`). Other
  kinds (tf.Transform outputs) save none."""
  if cfg.data.kind not in ('images', 'sequences'):
    return
  from beam_dl.compression import calibration as calib
  from beam_dl.operations import drift

  source = f'training inputs {cfg.data.train_files}'
  if cfg.data.kind == 'images':
    batches = calib.calibration_batches(cfg.data, cfg.data.train_files, PROFILE_EXAMPLES)
    profile = drift.input_profile((b[0] for b in batches), source=source)
  else:
    use_ids = bool(cfg.model_kwargs.get('vocab_size'))
    batches = calib.calibration_batches(cfg.data, cfg.data.train_files, PROFILE_EXAMPLES, use_ids=use_ids)
    profile = drift.sequence_input_profile(batches, source=source)
  drift.save_profile(profile, os.path.join(model_dir, drift.PROFILE_FILE))


def _export_quantized(cfg: TrainConfig, spec, variables, workdir: str) -> str:
  """After quantization-aware training: WORKDIR/model_int8, calibrated on
  a few training batches."""
  from beam_dl.compression import calibration as calib
  from beam_dl.compression import quantize

  calibration = calib.calibration_batches(
    cfg.data, cfg.data.train_files, 256, use_ids=bool(cfg.model_kwargs.get('vocab_size'))
  )
  qspec, qvars = quantize.quantize(spec, variables, calibration=calibration)
  return checkpoints.save(os.path.join(workdir, QUANTIZED_MODEL_DIR), qspec, qvars)


def _mean(metrics: list[dict]) -> dict:
  return {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}


def _fmt(metrics: dict) -> str:
  return ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in metrics.items())
