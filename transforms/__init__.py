"""beam_dl's public PTransforms, by area.

Names resolve lazily (PEP 562), so `from transforms import DecodeImages`
doesn't import tf.Transform or the windowing code.
"""

import importlib

_EXPORTS = {
  # Images: read, decode, normalise.
  'ReadImageFiles': 'images',
  'ReadImageExamples': 'images',
  'DecodeImages': 'images',
  'NormalizeImages': 'images',
  # Inference.
  'RunInferenceWithDeadLetters': 'inference',
  'ClassifyImages': 'inference',
  'InferenceOutputs': 'inference',
  # Sequences and events.
  'ReadSequenceExamples': 'sequences',
  'ParseSequenceExamples': 'sequences',
  'ReadEvents': 'sequences',
  'ReadEventBlocks': 'sequences',
  'ParseEvents': 'sequences',
  'AssembleSequences': 'sequences',
  'HashIds': 'sequences',
  'BucketByLength': 'sequences',
  'PadSequences': 'sequences',
  'ChunkSequences': 'sequences',
  # Event-time windows: features, RNN sequences, spectrograms.
  'EventTimestamps': 'windowing',
  'WindowedFeatures': 'windowing',
  'WindowedSequences': 'windowing',
  'WindowedSpectrograms': 'windowing',
  'WindowedOutputs': 'windowing',
  # Event sources (files, watched directory, Pub/Sub, Kafka) and the scoring steps around a model.
  'EventSource': 'event_sources',
  'ReadEventLines': 'event_sources',
  'ToModelInputFn': 'sequence_scoring',
  'FormatScoreFn': 'sequence_scoring',
  'WriteWindowedJsonLines': 'io',
  # TFRecords: damage-tolerant reading; writing training data.
  'ReadTFRecords': 'tfrecords',
  'WriteImageExamples': 'tfrecords',
  'WriteSequenceExamples': 'tfrecords',
  'WriteJsonLines': 'io',
  # tf.Transform: analyse once, apply in training and serving.
  'CanonicalImageFiles': 'preprocessing',
  'CanonicalImageRecords': 'preprocessing',
  'CanonicalSequences': 'preprocessing',
  'AnalyzeAndTransform': 'preprocessing',
  'WriteTransformedExamples': 'preprocessing',
  'ExtractStats': 'preprocessing',
  'ApplySavedTransform': 'preprocessing',
  'TransformImagesForInference': 'preprocessing',
  'TransformSequencesForInference': 'preprocessing',
  # Operating models: drift against a reference profile, metrics for Prometheus.
  'ComputeDrift': 'drift',
  'BuildDriftProfile': 'drift',
  'CountDeadLetters': 'metrics',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'transforms.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return __all__
