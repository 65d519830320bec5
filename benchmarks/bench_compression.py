"""Float vs int8 / pruned 50% / pruned 80% / distilled student, side by side in one run.

    python -m benchmarks.bench_compression --workdir /tmp/bench_compression

For each of three models -- digits SmallCNN (8x8), a small ResNet on the
digits upscaled to 32x32 RGB, and the CO2 LSTM forecaster -- it trains the
float model with `pipelines.train`'s trainer, then:

  int8       `pipelines.compress` (qwix PTQ, static activations calibrated on
             256 training examples; weight-only int8 for the LSTM)
  pruned     gradual magnitude pruning of the trained float model
             (`init_dir`): 0 -> 50% / 80% of every kernel along the cubic
             schedule over the first half of --prune_steps fine-tuning steps
             at 1/3 of the float learning rate, then recovery at that
             sparsity
  student    a model with >= 3x fewer parameters distilled from the float
             one; per-family settings in FAMILIES (student width, steps,
             temperature, soft-loss weight, mixup "function matching")

and reports held-out accuracy (skill_vs_zero for the LSTM: 1 - MSE / MSE of
predicting no change), parameters, the model dir's size on disk, and
throughput on CPU: the served model's steady-state predict rate, and Beam
RunInference (examples/s, whole DirectRunner pipeline incl. start-up and
compiles). Printed as a table with ratios against the float model; `--json`
writes the rows too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402

DIGITS_CONFIG = 'pipelines/configs/digits_cnn.py'
RESNET_CONFIG = 'pipelines/configs/digits32_resnet.py'
CO2_CONFIG = 'pipelines/configs/co2_rnn.py'


@dataclasses.dataclass
class Family:
  """How one model family is compressed (the float config comes from
  float_configs()). Settings chosen from the runs in benchmarks/RESULTS.md."""

  student_kwargs: dict  # the student's model_kwargs (>= 3x fewer parameters)
  student_steps: float  # student training steps, as a multiple of the float's
  temperature: float = 4.0
  weight: float = 0.7  # soft-loss weight (1: the teacher only)
  mixup: float = 0.0  # > 0: distil on mixup blends the teacher labels (needs weight 1)
  soft_loss: str = 'kl'
  prune_exclude: tuple = ()  # kernels the pruned models keep dense


# Students have 3.5-4x fewer parameters; the pruned models keep their first
# layer (the stem convolution; the LSTM's input kernels) and the head dense:
# a few hundred weights that every input or output passes through.
FAMILIES = {
  'digits SmallCNN': Family(
    {'num_classes': 10, 'features': [16, 32], 'hidden': 64}, student_steps=2.0, prune_exclude=('^Conv_0/', '^Dense_1/')
  ),
  'ResNet 32x32': Family(
    {'stage_sizes': [1, 1, 1], 'num_filters': 8, 'small_inputs': True, 'num_classes': 10},
    student_steps=2.0,
    prune_exclude=('^conv_init/', '^head/'),
  ),
  'CO2 LSTM': Family(
    {'cell': 'lstm', 'hidden_size': 16, 'pooling': 'last', 'num_outputs': 1, 'head': 'regression'},
    student_steps=3.0,
    weight=1.0,
    mixup=1.0,
    prune_exclude=('^head/', '/i[ifgo]/kernel$'),
  ),
}


def float_configs(data_dir: str, steps: int) -> dict:
  """{family: the float model's TrainConfig}."""
  from pipelines.train import resolve_config

  common = [f'num_steps={steps}', 'eval_every=0', 'checkpoint_every=0']
  digits = resolve_config(DIGITS_CONFIG, data_dir, common)
  resnet = resolve_config(RESNET_CONFIG, data_dir, common)
  co2 = resolve_config(CO2_CONFIG, data_dir, common)
  return {'digits SmallCNN': digits, 'ResNet 32x32': resnet, 'CO2 LSTM': co2}


def pruned_config(cfg, family: Family, float_dir: str, sparsity: float, steps: int):
  """Gradual magnitude pruning of the trained float model: the cubic ramp
  over the first half of `steps`, then recovery, at 1/3 of the float LR."""
  c = cfg.compression.__class__(
    prune_sparsity=sparsity,
    prune_start_step=0,
    prune_end_step=steps // 2,
    prune_every=5,
    prune_exclude=family.prune_exclude,
  )
  return cfg.replace(
    init_dir=float_dir, num_steps=steps, learning_rate=cfg.learning_rate / 3, warmup_steps=0, compression=c
  )


def student_config(cfg, family: Family, teacher_dir: str):
  c = cfg.compression.__class__(
    teacher_dir=teacher_dir,
    distill_temperature=family.temperature,
    distill_weight=family.weight,
    distill_mixup=family.mixup,
    distill_loss=family.soft_loss,
  )
  return cfg.replace(
    model_kwargs=dict(family.student_kwargs), num_steps=int(family.student_steps * cfg.num_steps), compression=c
  )


def held_out(cfg):
  """(list of raw examples as served, labels or targets) of the eval files."""
  from beam_dl.training import input_pipeline

  xs, ys = [], []
  for b in input_pipeline.make_dataset(cfg.data, cfg.data.eval_files, 256, train=False).as_numpy_iterator():
    if 'mask' in b:
      xs += [x[m] for x, m in zip(b['inputs'], b['mask'])]
    else:
      xs += list(b['inputs'])
    ys.append(b['label'] if cfg.task == 'classification' else b['target'].reshape(len(b['inputs']), -1))
  return xs, np.concatenate(ys)


def quality(outputs, targets, task) -> float:
  if task == 'classification':
    return float(np.mean(np.argmax(outputs, -1) == targets))
  return float(1.0 - np.mean((outputs.reshape(targets.shape) - targets) ** 2) / np.mean(targets**2))


def runinference_rate(model_dir: str, examples, repeat: int) -> float:
  """Examples/s through Beam RunInference (DirectRunner, one process)."""
  import apache_beam as beam
  from apache_beam.ml.inference.base import RunInference

  from beam_dl.serving.handler import JaxModelHandler

  data = list(examples) * repeat
  t = time.perf_counter()
  with beam.Pipeline() as p:
    _ = (
      p
      | beam.Create(data, reshuffle=False)
      | RunInference(JaxModelHandler(model_dir, max_batch_size=256))
      | beam.combiners.Count.Globally()
    )
  return len(data) / (time.perf_counter() - t)


def predict_rate(model, examples, rounds: int = 5) -> float:
  """Steady-state examples/s of the loaded model (compiles excluded)."""
  model.predict(examples)
  t = time.perf_counter()
  for _ in range(rounds):
    model.predict(examples)
  return rounds * len(examples) / (time.perf_counter() - t)


def num_params(variables) -> int:
  import jax

  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(variables['params'])))


def evaluate(variants, cfg, examples, targets, repeat, rounds: int = 3) -> list[dict]:
  """One row per (name, model_dir). Rates are measured interleaved -- every
  variant once per round, best round kept -- so a loaded machine slows all
  variants alike instead of whichever ran during a busy spell. A warm-up
  pipeline runs first, so the first variant's RunInference does not pay for
  Beam's start-up in the process."""
  from beam_dl.models import checkpoints
  from beam_dl.serving.handler import JaxModelHandler
  from pipelines.compress import dir_bytes

  models = {name: JaxModelHandler(d, max_batch_size=256).load_model() for name, d in variants}
  rows = {}
  for name, d in variants:
    spec, variables = checkpoints.load(d)
    rows[name] = {
      'variant': name,
      'quality': round(quality(models[name].predict(examples), targets, cfg.task), 4),
      'params': num_params(variables) if not spec.quantization else None,
      'dir_bytes': dir_bytes(d),
      'variable_bytes': int(models[name].num_bytes),
      'predict_per_s': 0.0,
      'runinference_per_s': 0.0,
      'model_dir': d,
    }
    if 'pruning' in (spec.extra.get('metrics') or {}):
      rows[name]['sparsity'] = spec.extra['metrics']['pruning']['sparsity']
  for _ in range(rounds):
    for name, _dir in variants:
      rows[name]['predict_per_s'] = max(rows[name]['predict_per_s'], round(predict_rate(models[name], examples), 1))
  runinference_rate(variants[0][1], examples[:16], 1)  # warm-up
  for name, d in variants:
    rows[name]['runinference_per_s'] = round(runinference_rate(d, examples, repeat), 1)
  return [rows[name] for name, _ in variants]


def run_family(family: str, cfg, workdir: str, *, repeat: int, prune_steps: int, sparsities) -> list[dict]:
  from beam_dl.training import train_and_evaluate
  from pipelines import compress

  tag = family.split()[0].lower() + '_' + family.split()[-1].lower()
  base = os.path.join(workdir, tag)
  times = {}
  t = time.perf_counter()
  teacher = train_and_evaluate(cfg, f'{base}/float', summary_dir=None)['model_dir']
  times['float'] = time.perf_counter() - t
  t = time.perf_counter()
  qsummary = compress.compress(teacher, f'{base}/int8', calibration=cfg.data.train_files, calibration_examples=256)
  int8 = f'int8 ({qsummary["quantization"]["method"]})'
  times[int8] = time.perf_counter() - t
  variants = [('float', teacher), (int8, f'{base}/int8')]
  for sparsity in sparsities:
    t = time.perf_counter()
    pruned_cfg = pruned_config(cfg, FAMILIES[family], teacher, sparsity, prune_steps)
    pruned = train_and_evaluate(pruned_cfg, f'{base}/pruned{sparsity:g}', summary_dir=None)
    times[f'pruned {sparsity:.0%}'] = time.perf_counter() - t
    variants.append((f'pruned {sparsity:.0%}', pruned['model_dir']))
  t = time.perf_counter()
  student = train_and_evaluate(student_config(cfg, FAMILIES[family], teacher), f'{base}/student', summary_dir=None)
  times['distilled student'] = time.perf_counter() - t
  variants.append(('distilled student', student['model_dir']))
  print(f'[{family}] seconds: ' + ', '.join(f'{k} {v:.0f}' for k, v in times.items()), flush=True)
  examples, targets = held_out(cfg)
  rows = evaluate(variants, cfg, examples, targets, repeat)
  for row in rows:
    row['family'] = family
    row['build_s'] = round(times[row['variant']], 1)
    print(json.dumps(row), flush=True)
  return rows


def table(rows) -> str:
  lines = [
    '| model | variant | quality | vs float | params | sparsity | dir bytes | size ratio | variables bytes | '
    'predict ex/s | ratio | RunInference ex/s | ratio |',
    '|' + '---|' * 13,
  ]
  floats = {r['family']: r for r in rows if r['variant'] == 'float'}
  for r in rows:
    f = floats[r['family']]
    params = (
      'int8'
      if not r['params']
      else f'{r["params"]:,}'
      if r['params'] == f['params']
      else f'{r["params"]:,} ({f["params"] / r["params"]:.1f}x fewer)'
    )
    lines.append(
      f'| {r["family"]} | {r["variant"]} | {r["quality"]:.4f} | {r["quality"] - f["quality"]:+.4f} | {params} | '
      f'{r.get("sparsity", "")} | {r["dir_bytes"]:,} | {r["dir_bytes"] / f["dir_bytes"]:.2f} | '
      f'{r["variable_bytes"]:,} | {r["predict_per_s"]:,.0f} | {r["predict_per_s"] / f["predict_per_s"]:.2f}x | '
      f'{r["runinference_per_s"]:,.0f} | {r["runinference_per_s"] / f["runinference_per_s"]:.2f}x |'
    )
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/bench_compression')
  parser.add_argument('--steps', type=int, default=200, help='training steps of every float model')
  parser.add_argument('--prune_steps', type=int, default=200, help='fine-tuning steps of every pruned model')
  parser.add_argument('--sparsities', default='0.5,0.8')
  parser.add_argument('--repeat', type=int, default=2, help='held-out set repeats fed to RunInference')
  parser.add_argument('--only', default='', help='comma-separated subset: digits,resnet,co2')
  parser.add_argument('--json', default='', help='also write the rows here')
  parser.add_argument(
    '--table',
    nargs='+',
    default=(),
    metavar='JSON',
    help='only print one table of the rows in these --json files (e.g. one run per family)',
  )
  args = parser.parse_args(argv)
  if args.table:
    rows = [row for path in args.table for row in json.load(open(path))]
    print(table(rows))
    return rows
  import logging

  logging.basicConfig(level=logging.WARNING)
  import jax

  print(
    f'backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), steps={args.steps}, '
    f'prune_steps={args.prune_steps}',
    flush=True,
  )
  sparsities = [float(s) for s in args.sparsities.split(',') if s]
  rows = []
  t = time.perf_counter()
  for family, cfg in float_configs(os.path.join(args.workdir, 'data'), args.steps).items():
    if args.only and not any(k in family.lower() for k in args.only.split(',')):
      continue
    rows += run_family(
      family, cfg, args.workdir, repeat=args.repeat, prune_steps=args.prune_steps, sparsities=sparsities
    )
  print(table(rows))
  print(f'total {time.perf_counter() - t:.0f}s')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == '__main__':
  main()
