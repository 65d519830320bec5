"""SmallCNN on scikit-learn's 8x8 digits preprocessed by tf.Transform.

    python -m pipelines.train --config pipelines/configs/digits_transformed.py:runlocal \
        --workdir /tmp/digits_tft

`prepare` writes the training digits as PNG/JPEG files to
DATA_DIR/images/train (unless that folder exists) and runs
`pipelines.preprocess` over them (the z-score of all pixels, analysed by
tf.Transform): DATA_DIR/transform holds the transform graph and
DATA_DIR/transformed/train-*.tfrecord the transformed records, which the
trainer reads directly (`DataConfig(kind='transformed')`: feature `image`,
label `label`). Serve the exported WORKDIR/model on raw images with the same
graph (DATA_DIR is --data_dir, default WORKDIR/data):

    inputs = keyed_image_bytes | TransformImagesForInference('WORKDIR/data/transform')
    preds = inputs.inputs | RunInferenceWithDeadLetters(JaxModelHandler('WORKDIR/model'))

Variants: those of digits_cnn.py (`runlocal`: 150 steps, `fsdp`, `tensor`,
...). There is no eval split: pipelines.preprocess analyses and transforms
one input.
"""

import os

from beam_dl.training.config import DataConfig
from pipelines.configs import digits_cnn


def get_config(variant=None):
  """digits_cnn's config and variants, on the transformed records."""
  return digits_cnn.get_config(variant).replace(
    data=DataConfig(
      kind='transformed', features=('image',), label_feature='label', shape=(8, 8, 1), shuffle_buffer=2048
    ),
    input_dtype='float32',  # already z-scored by the transform graph
    input_scale=1.0,
    eval_every=0,  # no eval split
  )


def prepare(config, data_dir):
  """Writes the training digits and preprocesses them with tf.Transform (once);
  points the config at the transform output and its records."""
  if config.data.transform_dir:  # given with --set data.transform_dir=... (and data.train_files)
    return config
  from pipelines import demo, preprocess

  transform_dir = os.path.join(data_dir, 'transform')
  output = os.path.join(data_dir, 'transformed', 'train')
  images = os.path.join(data_dir, 'images', 'train')
  if not os.path.isdir(os.path.join(transform_dir, 'transform_fn')):
    if not os.path.isdir(images):  # DATA_DIR/images/train may hold other images
      x_train, _, y_train, _ = demo.digit_images()
      demo.write_images(images, x_train, y_train)
    preprocess.run(
      [
        f'--input={images}/*',
        f'--transform_dir={transform_dir}',
        f'--output={output}',
        '--preprocess_image_shape=8,8,1',
      ]
    )
  config.data.transform_dir = transform_dir
  config.data.train_files = output + '-*.tfrecord'
  return config
