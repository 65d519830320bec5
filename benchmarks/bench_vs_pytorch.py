"""JaxModelHandler vs Beam's PytorchModelHandlerTensor: same CNN, same inputs, CPU.

The PyTorch model is a port of beam_dl's SmallCNN with the Flax weights
copied in (conv kernels HWIO->OIHW, dense [in, out]->[out, in], flatten in
NHWC order), and its outputs are checked against the Flax ones before
timing. Both pipelines read the same seeded uint8 images as single elements
(numpy arrays for JAX, zero-copy torch tensors for PyTorch), scale by 1/255
inside the model, and run on the same runner with the same fixed batch size.

    pip install -r benchmarks/requirements.txt   # torch==2.13.0 (CPU)
    python -m benchmarks.bench_vs_pytorch --batch 256 --num 16384
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import numpy as np

from benchmarks.bench_inference import MODELS, _Images, build_model, make_images, raw_loop


def torch_small_cnn(features, hidden, num_classes, channels, size):
  """SmallCNN in PyTorch: conv3x3 SAME + ReLU + maxpool2 per stage, dense, head."""
  import torch
  from torch import nn

  class SmallCNN(nn.Module):
    def __init__(self):
      super().__init__()
      convs, c, s = [], channels, size
      for width in features:
        convs.append(nn.Conv2d(c, width, 3, padding=1))
        c = width
        s = s // 2 if s >= 2 else s
      self.convs = nn.ModuleList(convs)
      self.dense = nn.Linear(c * s * s, hidden)
      self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):  # uint8 NHWC, as the JAX handler is fed
      x = x.permute(0, 3, 1, 2).float() * (1 / 255)
      for conv in self.convs:
        x = torch.relu(conv(x))
        if min(x.shape[2:]) >= 2:
          x = nn.functional.max_pool2d(x, 2)
      x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # flatten in Flax's NHWC order
      return self.head(torch.relu(self.dense(x)))

  return SmallCNN


def flax_to_torch_state(params) -> dict:
  """SmallCNN Flax params -> the torch port's state_dict."""
  import torch

  state, i = {}, 0
  while f'Conv_{i}' in params:
    conv = params[f'Conv_{i}']
    state[f'convs.{i}.weight'] = torch.from_numpy(np.ascontiguousarray(np.transpose(conv['kernel'], (3, 2, 0, 1))))
    state[f'convs.{i}.bias'] = torch.tensor(np.asarray(conv['bias']))
    i += 1
  for flax_name, torch_name in (('Dense_0', 'dense'), ('Dense_1', 'head')):
    state[f'{torch_name}.weight'] = torch.from_numpy(np.ascontiguousarray(np.asarray(params[flax_name]['kernel']).T))
    state[f'{torch_name}.bias'] = torch.tensor(np.asarray(params[flax_name]['bias']))
  return state


class _TorchImages(_Images):
  """Same images as bench_inference._Images, as zero-copy torch tensors."""

  def __call__(self, start_and_size):
    import torch

    # one tensor per example over its own bytes (a view of one big tensor
    # would carry the whole storage whenever it is pickled)
    return [torch.from_numpy(x) for x in super().__call__(start_and_size)]


def run_pipeline(handler, elements_fn, num, batch, runner) -> float:
  import apache_beam as beam
  from apache_beam.ml.inference.base import RunInference
  from apache_beam.options.pipeline_options import PipelineOptions

  start = time.perf_counter()
  with beam.Pipeline(runner=runner, options=PipelineOptions([])) as pipeline:
    _ = (
      pipeline
      | beam.Create([(i, batch) for i in range(0, num, batch)])
      | 'Examples' >> beam.FlatMap(elements_fn)
      | RunInference(handler)
      | 'Drop' >> beam.Map(lambda result: 1)  # don't ship examples to the count
      | beam.CombineGlobally(sum)
      | beam.Map(lambda n: None if n == num else (_ for _ in ()).throw(AssertionError(n)))
    )
  return time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--num', type=int, default=16384)
  parser.add_argument('--runner', default='DirectRunner')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args(argv)

  import torch
  from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

  from beam_dl.models import checkpoints
  from beam_dl.serving.handler import JaxModelHandler

  torch.set_num_threads(os.cpu_count())
  kwargs, size, channels = MODELS['small_cnn']
  with tempfile.TemporaryDirectory() as workdir:
    model_dir, spec = build_model('small_cnn', workdir)
    _, variables = checkpoints.load(model_dir)
    model_class = torch_small_cnn(kwargs['features'], kwargs['hidden'], kwargs['num_classes'], channels, size)
    state_path = os.path.join(workdir, 'small_cnn.pt')
    torch.save(flax_to_torch_state(variables['params']), state_path)

    jax_handler = JaxModelHandler(
      model_dir, max_batch_size=args.batch, min_batch_size=args.batch, batch_buckets=[args.batch]
    )
    torch_handler = PytorchModelHandlerTensor(
      state_dict_path=state_path,
      model_class=model_class,
      model_params={},
      min_batch_size=args.batch,
      max_batch_size=args.batch,
    )
    jax_model = jax_handler.load_model()  # the pipeline reuses this compiled copy
    torch_model = torch_handler.load_model()
    images = make_images(args.num, spec.input_shape)
    with torch.inference_mode():
      torch_out = torch_model(torch.from_numpy(images[: args.batch])).numpy()
    jax_out = jax_model.predict(list(images[: args.batch]))
    max_diff = float(np.abs(torch_out - jax_out).max())
    assert np.allclose(torch_out, jax_out, atol=1e-3), max_diff
    print(
      f'SmallCNN {kwargs} on {spec.input_shape} uint8, batch {args.batch}, {args.num} images, '
      f'runner {args.runner}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)'
    )
    print(f'outputs agree: max |torch - jax| = {max_diff:.2e}')

    def torch_raw():
      start = time.perf_counter()
      tensor = torch.from_numpy(images)
      with torch.inference_mode():
        for i in range(0, args.num, args.batch):
          torch_model(tensor[i : i + args.batch])
      return time.perf_counter() - start

    torch_raw()  # warm-up
    rows = []
    for repeat in range(args.repeats):
      jax_raw = args.num / raw_loop(jax_model, images, args.batch)
      pt_raw = args.num / torch_raw()
      jax_beam = args.num / run_pipeline(
        jax_handler, _Images(args.num, spec.input_shape), args.num, args.batch, args.runner
      )
      pt_beam = args.num / run_pipeline(
        torch_handler, _TorchImages(args.num, spec.input_shape), args.num, args.batch, args.runner
      )
      rows.append((jax_beam, pt_beam, jax_raw, pt_raw))
      print(
        f'  run {repeat + 1}: RunInference JAX {jax_beam:8.1f} img/s | PyTorch {pt_beam:8.1f} img/s | '
        f'JAX/PyTorch {jax_beam / pt_beam:.2f} || raw loops: JAX {jax_raw:8.1f} | PyTorch {pt_raw:8.1f}'
      )
    jax_beam, pt_beam, jax_raw, pt_raw = np.median(np.array(rows), axis=0)
    print(
      f'median: RunInference JaxModelHandler {jax_beam:.1f} img/s vs PytorchModelHandlerTensor {pt_beam:.1f} img/s '
      f'= {jax_beam / pt_beam:.2f}x | raw loops JAX {jax_raw:.1f} vs PyTorch {pt_raw:.1f} = {jax_raw / pt_raw:.2f}x'
    )


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.WARNING)
  main()
