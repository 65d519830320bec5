"""Float vs int8 / pruned / distilled student, side by side in one run.

    python -m benchmarks.bench_compression --workdir /tmp/bench_compression

For each of three models -- digits SmallCNN (8x8), a small ResNet on the
digits upscaled to 32x32 RGB, and the CO2 LSTM forecaster -- it trains the
float model with `pipelines.train`'s trainer, then:

  int8      `pipelines.compress` (qwix PTQ, static activations calibrated on
            256 training examples; weight-only int8 for the LSTM)
  pruned    the same training with magnitude pruning to --sparsity
  student   a smaller model distilled from the float one (T=4, weight 0.7)

and reports held-out accuracy (skill_vs_zero for the LSTM: 1 - MSE / MSE of
predicting no change), the model dir's size on disk, and throughput through
Beam RunInference on CPU (examples/s, whole pipeline incl. start-up and
compiles; and the served model's steady-state predict rate). Printed as a
table with ratios against the float model; `--json` writes the rows too.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402

DIGITS_CONFIG = 'pipelines/configs/digits_cnn.py'
CO2_CONFIG = 'pipelines/configs/co2_rnn.py'


def write_digits32(data_dir: str) -> tuple[str, str]:
  """The digits (0..16) upscaled 4x to 32x32, grey copied to RGB, as TFRecords."""
  from sklearn.datasets import load_digits

  from beam_dl.formats.image_example import encode_image_example
  from beam_dl.training import datasets

  if glob.glob(f'{data_dir}/digits32_train-*'):
    return f'{data_dir}/digits32_train-*', f'{data_dir}/digits32_eval-*'
  d = load_digits()
  images = np.repeat(np.repeat(d.images, 4, 1), 4, 2).astype(np.uint8)
  images = np.repeat(images[..., None], 3, -1)
  order = np.random.default_rng(0).permutation(len(images))
  cut = int(0.8 * len(order))
  for name, idx in (('train', order[:cut]), ('eval', order[cut:])):
    records = [encode_image_example(f'{name}/{i}', images[i], int(d.target[i])) for i in idx]
    datasets.write_shards(records, f'{data_dir}/digits32_{name}', 4)
  return f'{data_dir}/digits32_train-*', f'{data_dir}/digits32_eval-*'


def configs(data_dir: str, steps: int, sparsity: float):
  """{family: (float config, pruned config, student config)}."""
  from pipelines.train import resolve_config

  digits = resolve_config(DIGITS_CONFIG, data_dir, [f'num_steps={steps}', 'eval_every=0', 'checkpoint_every=0'])
  train32, eval32 = write_digits32(data_dir)
  resnet = digits.replace(
      model='resnet', model_kwargs={'stage_sizes': [1, 1, 1], 'num_filters': 16, 'small_inputs': True,
                                    'num_classes': 10},
      data=digits.data.__class__(kind='images', shape=(32, 32, 3), train_files=train32, eval_files=eval32,
                                 shuffle_buffer=2048),
      batch_size=32, learning_rate=3e-3,
  )
  co2 = resolve_config(CO2_CONFIG, data_dir, [f'num_steps={steps}', 'checkpoint_every=0'])
  out = {}
  for family, cfg, student_kwargs in (
      ('digits SmallCNN', digits, {'num_classes': 10, 'features': [16, 32], 'hidden': 64}),
      ('ResNet 32x32', resnet, {**resnet.model_kwargs, 'num_filters': 8}),
      ('CO2 LSTM', co2, {**co2.model_kwargs, 'hidden_size': 16}),
  ):
    c = cfg.compression
    pruned = cfg.replace(compression=c.__class__(prune_sparsity=sparsity, prune_end_step=int(0.7 * steps),
                                                 prune_every=5))
    student = cfg.replace(model_kwargs=student_kwargs)
    out[family] = (cfg, pruned, student)
  return out


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

  from beam_dl.handler import JaxModelHandler

  data = list(examples) * repeat
  t = time.perf_counter()
  with beam.Pipeline() as p:
    _ = (p | beam.Create(data, reshuffle=False)
         | RunInference(JaxModelHandler(model_dir, max_batch_size=256))
         | beam.combiners.Count.Globally())
  return len(data) / (time.perf_counter() - t)


def predict_rate(model, examples, rounds: int = 5) -> float:
  """Steady-state examples/s of the loaded model (compiles excluded)."""
  model.predict(examples)
  t = time.perf_counter()
  for _ in range(rounds):
    model.predict(examples)
  return rounds * len(examples) / (time.perf_counter() - t)


def evaluate(variants, cfg, examples, targets, repeat, rounds: int = 3) -> list[dict]:
  """One row per (name, model_dir). Rates are measured interleaved -- every
  variant once per round, best round kept -- so a loaded machine slows all
  variants alike instead of whichever ran during a busy spell."""
  from beam_dl.handler import JaxModelHandler
  from pipelines.compress import dir_bytes

  models = {name: JaxModelHandler(d, max_batch_size=256).load_model() for name, d in variants}
  rows = {name: {
      'variant': name,
      'quality': round(quality(models[name].predict(examples), targets, cfg.task), 4),
      'dir_bytes': dir_bytes(d),
      'variable_bytes': int(models[name].num_bytes),
      'predict_per_s': 0.0,
      'runinference_per_s': 0.0,
      'model_dir': d,
  } for name, d in variants}
  for _ in range(rounds):
    for name, d in variants:
      rows[name]['predict_per_s'] = max(rows[name]['predict_per_s'], round(predict_rate(models[name], examples), 1))
  for name, d in variants:
    rows[name]['runinference_per_s'] = round(runinference_rate(d, examples, repeat), 1)
  return [rows[name] for name, _ in variants]


def run_family(family, cfgs, workdir, repeat) -> list[dict]:
  from beam_dl.training import train_and_evaluate
  from pipelines import compress

  cfg, pruned_cfg, student_cfg = cfgs
  tag = family.split()[0].lower() + '_' + family.split()[-1].lower()
  base = os.path.join(workdir, tag)
  t = time.perf_counter()
  float_summary = train_and_evaluate(cfg, f'{base}/float')
  teacher = float_summary['model_dir']
  print(f'[{family}] float trained in {time.perf_counter() - t:.0f}s', flush=True)
  qsummary = compress.compress(teacher, f'{base}/int8', calibration=cfg.data.train_files, calibration_examples=256)
  pruned = train_and_evaluate(pruned_cfg, f'{base}/pruned')
  student_cfg = student_cfg.replace(compression=student_cfg.compression.__class__(
      teacher_dir=teacher, distill_temperature=4.0, distill_weight=0.7))
  student = train_and_evaluate(student_cfg, f'{base}/student')
  examples, targets = held_out(cfg)
  variants = [('float', teacher), (f"int8 ({qsummary['quantization']['method']})", f'{base}/int8'),
              (f"pruned {pruned['pruning']['sparsity']:.0%}", pruned['model_dir']),
              ('distilled student', student['model_dir'])]
  rows = evaluate(variants, cfg, examples, targets, repeat)
  for row in rows:
    row['family'] = family
    print(json.dumps(row), flush=True)
  return rows


def table(rows) -> str:
  lines = ['| model | variant | quality | vs float | dir bytes | size ratio | variables bytes | predict ex/s | '
           'ratio | RunInference ex/s | ratio |', '|' + '---|' * 11]
  floats = {r['family']: r for r in rows if r['variant'] == 'float'}
  for r in rows:
    f = floats[r['family']]
    lines.append(
        f"| {r['family']} | {r['variant']} | {r['quality']:.4f} | {r['quality'] - f['quality']:+.4f} | "
        f"{r['dir_bytes']:,} | {r['dir_bytes'] / f['dir_bytes']:.2f} | {r['variable_bytes']:,} | "
        f"{r['predict_per_s']:,.0f} | {r['predict_per_s'] / f['predict_per_s']:.2f}x | "
        f"{r['runinference_per_s']:,.0f} | {r['runinference_per_s'] / f['runinference_per_s']:.2f}x |")
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='/tmp/bench_compression')
  parser.add_argument('--steps', type=int, default=300, help='training steps of every model')
  parser.add_argument('--sparsity', type=float, default=0.8)
  parser.add_argument('--repeat', type=int, default=2, help='held-out set repeats fed to RunInference')
  parser.add_argument('--only', default='', help='comma-separated subset: digits,resnet,co2')
  parser.add_argument('--json', default='', help='also write the rows here')
  args = parser.parse_args(argv)
  import logging

  logging.basicConfig(level=logging.WARNING)
  import jax

  print(f'backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), steps={args.steps}', flush=True)
  rows = []
  for family, cfgs in configs(os.path.join(args.workdir, 'data'), args.steps, args.sparsity).items():
    if args.only and not any(k in family.lower() for k in args.only.split(',')):
      continue
    rows += run_family(family, cfgs, args.workdir, args.repeat)
  print(table(rows))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == '__main__':
  main()
