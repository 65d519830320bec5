"""End to end: tf.Transform preprocess -> train on the transformed records -> serve.

`pipelines.train --config pipelines/configs/digits_transformed.py` runs the
real `pipelines.preprocess` over the training digits (PNG/JPEG files) on the
DirectRunner, trains on its records through the one input pipeline
(`DataConfig(kind='transformed')`), and exports the model. Serving scores
the raw files through the saved transform graph and JaxModelHandler in
RunInference, and raw uint8 pixels through the scaler folded into the spec:
both give the trainer's logits on the same examples.
"""

from __future__ import annotations

import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines import train as train_cli

CONFIG = 'pipelines/configs/digits_transformed.py:runlocal'
IMAGES = 400  # training digits preprocessed, trained on and served


@pytest.mark.slow
def test_preprocess_train_serve_with_the_saved_transform(tmp_path):
  import jax

  from beam_dl.decoding.images import decode_image
  from beam_dl.models import checkpoints
  from beam_dl.preprocessing import canonical, tft_jax
  from beam_dl.serving.handler import JaxModelHandler
  from beam_dl.training import input_pipeline
  from beam_dl.training.summaries import read_scalars
  from pipelines import demo
  from transforms.inference import RunInferenceWithDeadLetters
  from transforms.preprocessing import TransformImagesForInference

  workdir = str(tmp_path / 'run')
  x_train, _, y_train, _ = demo.digit_images()  # a part of the training digits keeps the test short
  demo.write_images(os.path.join(workdir, 'data', 'images', 'train'), x_train[:IMAGES], y_train[:IMAGES])
  summary = train_cli.main(
    [
      '--config',
      CONFIG,
      '--workdir',
      workdir,
      '--set',
      'num_steps=30',
      '--set',
      'log_every=10',
      '--set',
      'checkpoint_every=30',
      '--set',
      'warmup_steps=5',
      '--set',
      'model_kwargs.features=[8, 16]',
      '--set',
      'model_kwargs.hidden=32',
    ]
  )
  losses = [loss for _, loss in read_scalars(summary['tensorboard_dir'])['train']['loss']]
  assert len(losses) == 3 and losses[0] > losses[1] > losses[2] and losses[2] < 0.8 * losses[0], losses

  # The trainer's view: its config (prepare finds the transform output) and
  # input pipeline; the exported model's logits on every training example.
  cfg = train_cli.resolve_config(CONFIG, os.path.join(workdir, 'data'))
  records = input_pipeline.transformed_examples(cfg.data.transform_dir, cfg.data.train_files)
  (batch,) = input_pipeline.make_dataset(cfg.data, cfg.data.train_files, 4096, train=False).as_numpy_iterator()
  np.testing.assert_array_equal(batch['inputs'], np.stack([r['image'].reshape(8, 8, 1) for r in records.values()]))
  model_dir = summary['model_dir']
  spec, variables = checkpoints.load(model_dir)
  assert spec.input_dtype == 'float32' and spec.input_shape == (8, 8, 1)
  logits = np.asarray(jax.jit(lambda v, x: spec.build().apply(v, spec.normalize(x)))(variables, batch['inputs']))
  want = dict(zip(records, logits))
  assert len(want) == IMAGES
  paths = sorted(want)
  assert all(os.path.exists(p) for p in paths)  # keys are the raw files' paths

  # The same weights with the transform's scaler folded into the spec: raw uint8 in.
  folded_dir = checkpoints.save(
    str(tmp_path / 'folded'), tft_jax.fold_into_spec(spec, cfg.data.transform_dir), variables, fmt='msgpack'
  )
  image_spec = canonical.image_spec_for((8, 8, 1))
  raw = [(p, decode_image(open(p, 'rb').read(), image_spec)) for p in paths]

  def close_to_trainer(actual):
    actual = dict(actual)
    assert sorted(actual) == paths
    for path in paths:
      np.testing.assert_allclose(actual[path], want[path], rtol=1e-4, atol=1e-4, err_msg=path)

  with TestPipeline(runner='FnApiRunner') as p:
    files = p | 'Files' >> beam.Create([(path, open(path, 'rb').read()) for path in paths] + [('bad.png', b'junk')])
    inputs = files | TransformImagesForInference(cfg.data.transform_dir)
    graph = inputs.inputs | 'ViaGraph' >> RunInferenceWithDeadLetters(JaxModelHandler(model_dir, max_batch_size=64))
    folded = (p | 'Raw' >> beam.Create(raw)) | 'ViaFolded' >> RunInferenceWithDeadLetters(
      JaxModelHandler(folded_dir, max_batch_size=64)
    )
    to_logits = lambda kv: (kv[0], np.asarray(kv[1].inference))
    assert_that(graph.predictions | 'GraphLogits' >> beam.Map(to_logits), close_to_trainer, label='Graph')
    assert_that(folded.predictions | 'FoldedLogits' >> beam.Map(to_logits), close_to_trainer, label='Folded')
    assert_that(
      inputs.failed | beam.Map(lambda f: (f['key'], f['stage'])), equal_to([('bad.png', 'decode')]), label='Failed'
    )
