"""JAX equivalents of the tf.Transform scalers, from the analysed statistics.

`pipelines.preprocess` reports the statistics its scalers used
(`<transform_dir>/stats.json`). These functions redo the same arithmetic as
`tft.scale_to_z_score` / `tft.scale_to_0_1` in jnp, op for op, so a JAX
serving path (or a jitted training step) can preprocess without TensorFlow
and match the saved transform graph to float32 rounding. `fold_into_spec`
goes one step further: both scalers are affine, so they fold into a
`ModelSpec`'s `input_scale`/`input_offset` and the JAX RunInference handler
applies them inside its jitted forward pass on the raw uint8 input.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from beam_dl.models.checkpoints import ModelSpec
from beam_dl.preprocessing import config as config_lib
from beam_dl.preprocessing import preprocessing_fns
from beam_dl.preprocessing import stats as stats_lib


def z_score(x, mean, var):
  """`tft.scale_to_z_score`: (x - mean) / sqrt(var), or x - mean when var == 0."""
  numerator = jnp.asarray(x, jnp.float32) - jnp.float32(mean)
  std = jnp.sqrt(jnp.float32(var))
  return jnp.where(std != 0, numerator / std, numerator)


def scale_to_0_1(x, minimum, maximum):
  """`tft.scale_to_0_1`: (x - min) / (max - min), or sigmoid(x) when min == max."""
  x = jnp.asarray(x, jnp.float32)
  minimum, maximum = jnp.float32(minimum), jnp.float32(maximum)
  scaled = jnp.where(minimum < maximum, (x - minimum) / (maximum - minimum), jax.nn.sigmoid(x))
  return scaled * jnp.float32(1.0) + jnp.float32(0.0)


def _scalar(analysed: dict, name: str) -> np.float32:
  return np.float32(analysed[name][0])


def scaler(transform_dir: str, feature: str) -> Callable:
  """The jitted scaler `pipelines.preprocess` applied to `feature` ('image',
  'values_0', ...), with its analysed statistics baked in."""
  config = config_lib.load(transform_dir)
  analysed = stats_lib.load(transform_dir)
  if config.scaling == 'z_score':
    mean, var = _scalar(analysed, f'{feature}/mean'), _scalar(analysed, f'{feature}/var')
    return jax.jit(lambda x: z_score(x, mean, var))
  low, high = _scalar(analysed, f'{feature}/min'), _scalar(analysed, f'{feature}/max')
  return jax.jit(lambda x: scale_to_0_1(x, low, high))


def image_fn(transform_dir: str) -> Callable:
  """uint8 [B, H, W, C] images -> the float32 model input the transform graph gives."""
  return scaler(transform_dir, preprocessing_fns.IMAGE)


def fold_into_spec(spec: ModelSpec, transform_dir: str) -> ModelSpec:
  """`spec` with the image scaler folded into input_scale / input_offset.

  A model trained on transformed float images is then served on raw uint8
  images by `JaxModelHandler` (x * scale + offset inside jit): equal to the
  transform graph within float32 rounding (about 1e-6 relative), not bitwise.
  """
  config = config_lib.load(transform_dir)
  analysed = stats_lib.load(transform_dir)
  feature = preprocessing_fns.IMAGE
  if config.scaling == 'z_score':
    mean, var = float(_scalar(analysed, f'{feature}/mean')), float(_scalar(analysed, f'{feature}/var'))
    std = float(np.sqrt(np.float32(var)))
    scale, offset = (1.0 / std, -mean / std) if std != 0 else (1.0, -mean)
  else:
    low, high = float(_scalar(analysed, f'{feature}/min')), float(_scalar(analysed, f'{feature}/max'))
    if not low < high:
      raise ValueError('min == max: tft.scale_to_0_1 uses a sigmoid there, which is not affine')
    scale, offset = 1.0 / (high - low), -low / (high - low)
  return dataclasses.replace(spec, input_dtype='uint8', input_scale=scale, input_offset=offset)
