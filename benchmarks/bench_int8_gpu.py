"""float32 vs bfloat16 vs int8 (qwix PTQ) forward rate of beam_dl's ResNets on one accelerator.

    python benchmarks/bench_int8_gpu.py --models resnet50,resnet32 --batch 256 --iters 30

The question bench_compression cannot answer on CPU: does int8 serve faster
where XLA has int8 kernels (GPU int8 tensor cores via cuBLASLt/cuDNN, TPU
int8 MXU)? It builds each model from beam_dl's registry with random weights,
then times the jitted forward pass (compiles excluded, median of --iters) of:
  float32    the trained-model format
  bfloat16   the same params, compute dtype bfloat16 (`dtype` kwarg)
  int8       qwix PTQ: int8 weights per output channel, int8 activations
             with per-batch (dynamic) scales -- the `qwix_ptq` method of
             `pipelines.compress --activations dynamic`
and prints images/s with the ratio to float32, plus the int8 output's error
relative to float32. Needs only jax, flax and qwix: it runs on a machine
without Beam or TensorFlow (the device machines), so Beam's flush fix is
stubbed out when apache_beam is absent and the qwix rules are the ones of
`beam_dl.compression.quantize._rules` for dynamic activations, written out
(that module imports beam_dl.models.checkpoints, hence Beam).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import types

if importlib.util.find_spec('apache_beam') is None:  # device machine: no Beam, no flush to fix
  sys.modules['beam_dl.beam_fixes'] = types.ModuleType('beam_dl.beam_fixes')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

MODELS = {
  'resnet50': ('resnet50', {'num_classes': 1000}, (224, 224, 3)),
  'resnet32': (
    'resnet',
    {'stage_sizes': [1, 1, 1], 'num_filters': 16, 'small_inputs': True, 'num_classes': 10},
    (32, 32, 3),
  ),
}


def int8_rules():
  import qwix

  return [
    qwix.QuantizationRule(
      module_path='.*',
      op_names=('conv_general_dilated',),
      weight_qtype='int8',
      act_qtype='int8',
      act_static_scale=False,
    ),
    qwix.QuantizationRule(
      module_path='.*',
      op_names=('dot_general', 'einsum'),
      weight_qtype='int8',
      act_qtype='int8',
      act_static_scale=False,
    ),
  ]


def timed(fn, variables, x, iters: int) -> float:
  """Median seconds per call, compile excluded."""
  jax.block_until_ready(fn(variables, x))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(variables, x))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def run(name: str, batch: int, iters: int) -> list[dict]:
  import flax.linen as nn
  import qwix

  from beam_dl import models

  registered, kwargs, shape = MODELS[name]
  x = jax.random.uniform(jax.random.key(1), (batch,) + shape, jnp.float32)
  f32 = models.build(registered, **kwargs)
  variables = nn.meta.unbox(f32.init(jax.random.key(0), x[:1]))
  bf16 = models.build(registered, **kwargs, dtype='bfloat16')
  q = qwix.quantize_model(f32, qwix.PtqProvider(int8_rules()))
  abstract = nn.meta.unbox(jax.eval_shape(q.init, jax.random.key(0), x[:1]))
  qvariables = {**variables, 'params': qwix.quantize_params(variables['params'], abstract['params'])}
  variants = {'float32': (f32, variables), 'bfloat16': (bf16, variables), 'int8': (q, qvariables)}
  outputs, rows = {}, []
  for label, (module, v) in variants.items():
    fn = jax.jit(module.apply)
    outputs[label] = np.asarray(fn(v, x), np.float32)
    rows.append(
      {'model': name, 'variant': label, 'batch': batch, 'images_per_s': round(batch / timed(fn, v, x, iters), 1)}
    )
  base = rows[0]['images_per_s']
  scale = float(np.max(np.abs(outputs['float32']))) or 1.0
  for row in rows:
    row['vs_float32'] = round(row['images_per_s'] / base, 2)
    row['max_abs_err_rel'] = round(float(np.max(np.abs(outputs[row['variant']] - outputs['float32']))) / scale, 4)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='resnet50,resnet32')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--iters', type=int, default=30)
  args = parser.parse_args(argv)
  dev = jax.devices()[0]
  print(f'backend: {jax.default_backend()} ({dev.device_kind}), jax {jax.__version__}', flush=True)
  rows = []
  for name in args.models.split(','):
    rows += run(name, args.batch, args.iters)
    for row in rows[-3:]:
      print(json.dumps(row), flush=True)
  print('| model | variant | batch | images/s | vs float32 | max abs error / max abs output |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(
      f'| {r["model"]} | {r["variant"]} | {r["batch"]} | {r["images_per_s"]:,.0f} | {r["vs_float32"]:.2f}x | '
      f'{r["max_abs_err_rel"]} |'
    )
  return rows


if __name__ == '__main__':
  main()
