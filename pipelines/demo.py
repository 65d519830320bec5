"""The flagship demo: real digit images -> trained Flax CNN -> Beam pipeline.

    python -m pipelines.demo --workdir demo_out

1. Writes scikit-learn's 1,797 real 8x8 digit images as PNG and JPEG files
   (DIR/images/{train,test}/), plus two broken files among the held-out
   inputs (a truncated JPEG and a text file named .jpg) to show dead letters.
2. Decodes the training files with the same decoder the pipeline uses and
   trains a small Flax CNN on the CPU; saves it with orbax to DIR/model.
3. Runs `pipelines.classify_images` on the DirectRunner over the held-out
   files, writing DIR/predictions/predictions-*.jsonl and predictions_failed-*.jsonl.
4. Prints held-out accuracy, counts of inputs, predictions and dead letters,
   and images per second.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import time

import numpy as np
from PIL import Image

from beam_dl import cli
from beam_dl.cli.options import non_negative_int, positive_int
from beam_dl.core.deadletter import failed_output
from beam_dl.decoding.images import ImageSpec, decode_image
from beam_dl.formats.jsonl import read_jsonl
from beam_dl.models import checkpoints
from beam_dl.training.quick import fit_arrays

_log = logging.getLogger('beam_dl.demo')
LABEL_IN_NAME = re.compile(r'_label(\d+)\.')
INPUT_SPEC = ImageSpec(height=8, width=8, channels=1)
INPUT_SPEC_SHAPE = (INPUT_SPEC.height, INPUT_SPEC.width, INPUT_SPEC.channels)


def digit_images(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn digits as uint8 [N, 8, 8] images: (x_train, y_train, x_test, y_test)."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return tuple(train_test_split(images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target))


def write_images(directory: str, images: np.ndarray, labels: np.ndarray) -> list[str]:
  """Writes images alternately as PNG and JPEG; the label is in the name."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i, (image, label) in enumerate(zip(images, labels)):
    ext, fmt, kwargs = ('png', 'PNG', {}) if i % 2 == 0 else ('jpg', 'JPEG', {'quality': 95})
    path = os.path.join(directory, f'digit_{i:04d}_label{label}.{ext}')
    Image.fromarray(image, mode='L').save(path, fmt, **kwargs)
    paths.append(path)
  return paths


def write_broken_inputs(directory: str) -> list[str]:
  """A truncated JPEG and a text file named .jpg: both must be dead letters."""
  buffer = io.BytesIO()
  Image.fromarray(np.full((64, 64), 128, np.uint8), mode='L').save(buffer, 'JPEG')
  truncated = os.path.join(directory, 'broken_truncated.jpg')
  with open(truncated, 'wb') as f:
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
  text = os.path.join(directory, 'broken_not_an_image.jpg')
  with open(text, 'w') as f:
    f.write('this is a text file, not a JPEG\n')
  return [truncated, text]


def train_model(train_paths: list[str], model_dir: str, steps: int, seed: int = 0) -> str:
  """Trains SmallCNN on the decoded training files and saves it to model_dir."""
  x = np.stack([decode_image(open(p, 'rb').read(), INPUT_SPEC) for p in train_paths])
  y = np.array([int(LABEL_IN_NAME.search(p).group(1)) for p in train_paths])
  spec = checkpoints.ModelSpec(
    name='small_cnn',
    kwargs={'num_classes': 10, 'features': [32, 64], 'hidden': 128},
    input_shape=INPUT_SPEC_SHAPE,
    input_dtype='uint8',
    input_scale=1.0 / 255.0,
    labels=[str(d) for d in range(10)],
    extra={'dataset': 'sklearn digits', 'train_examples': len(y), 'steps': steps},
  )
  variables, losses = fit_arrays(spec, (x,), y, steps=steps, batch_size=64, learning_rate=2e-3, seed=seed)
  _log.info('trained %d steps: loss %.3f -> %.3f', steps, np.mean(losses[:10]), np.mean(losses[-10:]))
  return checkpoints.save(model_dir, spec, variables)


def summarize(predictions: list[dict], failed: list[dict], num_inputs: int, seconds: float) -> dict:
  labelled = [(p, LABEL_IN_NAME.search(p['key'])) for p in predictions]
  correct = sum(int(m.group(1)) == p['label'] for p, m in labelled if m)
  return {
    'inputs': num_inputs,
    'predictions': len(predictions),
    'dead_letters': len(failed),
    'accuracy': correct / max(1, sum(1 for _, m in labelled if m)),
    'pipeline_seconds': round(seconds, 2),
    'images_per_second': round(num_inputs / seconds, 1),
  }


def main(argv=None) -> dict:
  parser = cli.ArgumentParser(
    prog='python -m pipelines.demo', description=__doc__.splitlines()[0], epilog=cli.BEAM_OPTIONS_NOTE
  )
  parser.add_argument('--workdir', required=True, help='Where images, model and outputs go.')
  parser.add_argument('--train_steps', type=positive_int, default=600)
  parser.add_argument(
    '--limit', type=non_negative_int, default=0, help='Use only this many images per split (0 = all).'
  )
  parser.add_argument('--seed', type=int, default=0)
  args, beam_args = parser.parse_known_args(argv)
  cli.check_known_flags(beam_args)  # before minutes of training, not after
  cli.require_writable(args.workdir, 'workdir', directory=True)

  from pipelines import classify_images

  x_train, x_test, y_train, y_test = digit_images(args.seed)
  if args.limit:
    x_train, y_train, x_test, y_test = (
      x_train[: args.limit],
      y_train[: args.limit],
      x_test[: args.limit],
      y_test[: args.limit],
    )
  workdir = os.path.abspath(args.workdir)
  train_paths = write_images(os.path.join(workdir, 'images', 'train'), x_train, y_train)
  test_dir = os.path.join(workdir, 'images', 'test')
  test_paths = write_images(test_dir, x_test, y_test) + write_broken_inputs(test_dir)
  _log.info('wrote %d train and %d held-out files under %s', len(train_paths), len(test_paths), workdir)

  model_dir = train_model(train_paths, os.path.join(workdir, 'model'), args.train_steps, args.seed)
  output = os.path.join(workdir, 'predictions', 'predictions')
  for stale in glob.glob(output + '-*.jsonl'):
    os.remove(stale)
  start = time.perf_counter()
  classify_images.run(
    [f'--input={test_dir}/*', f'--model_dir={model_dir}', f'--output={output}', '--runner=DirectRunner', *beam_args]
  )
  seconds = time.perf_counter() - start
  summary = summarize(
    read_jsonl(output + '-*.jsonl'), read_jsonl(failed_output(output) + '-*.jsonl'), len(test_paths), seconds
  )
  print(
    f'held-out accuracy {summary["accuracy"]:.3f} | inputs {summary["inputs"]} | '
    f'predictions {summary["predictions"]} | dead letters {summary["dead_letters"]} | '
    f'{summary["images_per_second"]} images/s ({summary["pipeline_seconds"]} s end to end, '
    'incl. pipeline start-up)'
  )
  print(f'outputs: {output}-*.jsonl, dead letters: {failed_output(output)}-*.jsonl   model: {model_dir}')
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  return summary


if __name__ == '__main__':
  cli.main(main, 'demo')
