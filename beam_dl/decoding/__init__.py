"""Bytes and records -> arrays: images with Pillow/tifffile (`images`),
sequences parsed from tf.train.SequenceExample (`sequences`), and their
padding, truncation and length buckets (`padding`). Pure functions; the
PTransforms that run them live in `transforms`."""
