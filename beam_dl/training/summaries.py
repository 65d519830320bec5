"""TensorBoard summaries of a training run, reading them back, and a PNG of the curves.

`SummaryWriter` writes scalars with TensorFlow's `tf.summary` (TensorBoard's
own format: one event-file directory per split, `train/` and `eval/`), so
`tensorboard --logdir WORKDIR/tensorboard` shows loss, metrics, learning rate
and throughput while a run goes. `read_scalars` reads them back with
TensorBoard's `EventAccumulator`; `plot_curves` draws them with matplotlib.
"""

from __future__ import annotations

import os
from typing import Mapping

SPLITS = ('train', 'eval')


class SummaryWriter:
  """Scalars per split, written by `tf.summary` file writers under `logdir/<split>`."""

  def __init__(self, logdir: str):
    import tensorflow as tf

    self._tf = tf
    self.logdir = logdir
    self._writers = {split: tf.summary.create_file_writer(os.path.join(logdir, split)) for split in SPLITS}

  def scalars(self, split: str, step: int, values: Mapping[str, float]) -> None:
    with self._writers[split].as_default():
      for name, value in values.items():
        if isinstance(value, (int, float)) and value == value:  # numbers, not NaN
          self._tf.summary.scalar(name, float(value), step=int(step))

  def flush(self) -> None:
    for writer in self._writers.values():
      writer.flush()

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()


def read_scalars(logdir: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
  """{split: {tag: [(step, value), ...]}} from the event files under `logdir`."""
  from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
  from tensorboard.util.tensor_util import make_ndarray

  out = {}
  for split in SPLITS:
    path = os.path.join(logdir, split)
    if not os.path.isdir(path):
      continue
    acc = EventAccumulator(path, size_guidance={TENSORS: 0})
    acc.Reload()
    out[split] = {
      tag: [(e.step, float(make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)] for tag in acc.Tags()['tensors']
    }
  return out


def plot_curves(logdir: str, png_path: str) -> str:
  """One panel per tag (train and eval on the same axes) -> PNG; returns the path."""
  import matplotlib

  matplotlib.use('Agg')  # files only, no display
  import matplotlib.pyplot as plt

  scalars = read_scalars(logdir)
  tags = sorted({tag for split in scalars.values() for tag in split})
  if not tags:
    raise ValueError(f'no scalar summaries under {logdir}')
  cols = min(3, len(tags))
  rows = -(-len(tags) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
  for ax, tag in zip(axes.flat, tags):
    for split, style in zip(SPLITS, ('-', 'o--')):
      points = scalars.get(split, {}).get(tag)
      if points:
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, style, label=split, markersize=3)
    ax.set_title(tag, fontsize=10)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(tags) :]:
    ax.axis('off')
  fig.tight_layout()
  os.makedirs(os.path.dirname(png_path) or '.', exist_ok=True)
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
  return png_path
