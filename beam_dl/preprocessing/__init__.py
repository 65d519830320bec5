"""tf.Transform preprocessing: one feature definition for training and serving.

  schemas            raw feature specs, canonical raw tf.Examples, TFXIO sources
  preprocessing_fns  the tf.Transform `preprocessing_fn`s (images, sequences)
  stats              the analysed statistics carried out of the transform graph

Training reads the transformed records through the one input pipeline:
`beam_dl.training.DataConfig(kind='transformed', transform_dir=...)`.
"""
