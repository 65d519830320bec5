"""SmallCNN on scikit-learn's 8x8 digits preprocessed by tf.Transform.

    python -m pipelines.train --config pipelines/configs/digits_transformed.py:runlocal \
        --workdir /tmp/digits_tft

`prepare` writes the training digits as PNG files and runs
`pipelines.preprocess` over them (the z-score of all pixels, analysed by
tf.Transform): WORKDIR/data/transform holds the transform graph and
WORKDIR/data/transformed/train-*.tfrecord the transformed records, which the
trainer reads directly (`DataConfig(kind='transformed')`: feature `image`,
label `label`). Serve the exported WORKDIR/model on raw images with the same
graph:

    inputs = keyed_image_bytes | TransformImagesForInference('WORKDIR/data/transform')
    preds = inputs.inputs | RunInferenceWithDeadLetters(JaxModelHandler('WORKDIR/model'))

Variants: (none) 1,000 steps; `runlocal` 150 steps. There is no eval split:
pipelines.preprocess analyses and transforms one input.
"""
import os

from beam_dl.training.config import DataConfig, TrainConfig


def get_config(variant=None):
  config = TrainConfig(
      model='small_cnn',
      model_kwargs={'num_classes': 10, 'features': [32, 64], 'hidden': 128},
      task='classification',
      labels=[str(i) for i in range(10)],
      data=DataConfig(kind='transformed', features=('image',), label_feature='label', shape=(8, 8, 1),
                      shuffle_buffer=2048),
      input_dtype='float32',  # already z-scored by the transform graph
      batch_size=64,
      num_steps=1000,
      learning_rate=3e-3,
      warmup_steps=50,
      weight_decay=1e-4,
      log_every=100,
      checkpoint_every=250,
  )
  if variant in (None, ''):
    return config
  if variant == 'runlocal':
    return config.replace(num_steps=150, log_every=25, checkpoint_every=50)
  raise ValueError(f'unknown variant {variant!r}')


def prepare(config, data_dir):
  """Writes the training digits and preprocesses them with tf.Transform (once);
  points the config at the transform output and its records."""
  if config.data.transform_dir:  # given with --set data.transform_dir=... (and data.train_files)
    return config
  from pipelines import demo, preprocess

  transform_dir = os.path.join(data_dir, 'transform')
  output = os.path.join(data_dir, 'transformed', 'train')
  if not os.path.isdir(os.path.join(transform_dir, 'transform_fn')):
    x_train, _, y_train, _ = demo.digit_images()
    images = os.path.join(data_dir, 'images', 'train')
    demo.write_images(images, x_train, y_train)
    preprocess.run([f'--input={images}/*', f'--transform_dir={transform_dir}', f'--output={output}',
                    '--preprocess_image_shape=8,8,1'])
  config.data.transform_dir = transform_dir
  config.data.train_files = output + '-*.tfrecord'
  return config
