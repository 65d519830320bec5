"""Every public PTransform declares its element types, and Beam checks them.

Each test builds the transform in a pipeline (construction only: Beam's
`pipeline_type_check` runs there) and asserts the element type of every
output PCollection; two tests apply transforms to the wrong elements and
expect Beam's construction-time TypeCheckError.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import ModelMetadata
from apache_beam.typehints.decorators import TypeCheckError
from apache_beam.typehints.native_type_compatibility import convert_to_beam_type

from beam_dl.core.element_types import (
  DeadLetter,
  DecodedImage,
  EncodedImage,
  KeyedArray,
  KeyedBytes,
  KeyedFeatures,
  Record,
)
from beam_dl.decoding.padding import PaddedBatch
from beam_dl.decoding.sequences import SequenceRecord
from beam_dl.features.spectrogram import SpectrogramSpec
from beam_dl.features.windows import WindowSpec
from beam_dl.formats.events import Event, EventSpec
from beam_dl.preprocessing import config as config_lib
from transforms import drift as drift_t
from transforms import images, io, metrics, preprocessing, sequences, tfrecords, windowing


def _is(pcoll, hint):
  assert pcoll.element_type == convert_to_beam_type(hint), (pcoll.element_type, hint)


@pytest.fixture
def p():
  return beam.Pipeline()


def _events(p):
  return p | 'Events' >> beam.Create([Event('a', 1.0, (1.0,)), Event('a', 2.0, (2.0,))])


def _records(p, label='Records'):
  return p | label >> beam.Create([SequenceRecord('a', np.zeros((2, 1), np.float32))])


def test_image_readers_and_decoding(p, tmp_path):
  files = p | 'Files' >> images.ReadImageFiles(str(tmp_path / '*.png'))
  _is(files.images, Tuple[str, bytes])
  _is(files.failed, DeadLetter)
  with_meta = p | 'FilesMeta' >> images.ReadImageFiles(str(tmp_path / '*.png'), with_metadata=True)
  _is(with_meta.images, Tuple[str, bytes, Dict[Any, Any]])
  examples = p | 'Examples' >> images.ReadImageExamples(str(tmp_path / '*.tfrecord'))
  _is(examples.images, EncodedImage)
  _is(examples.failed, DeadLetter)
  decoded = files.images | images.DecodeImages()
  _is(decoded.decoded, DecodedImage)
  _is(decoded.failed, DeadLetter)
  _is(decoded.decoded | images.NormalizeImages(), DecodedImage)
  _is((examples.images | 'Decode2' >> images.DecodeImages()).decoded, DecodedImage)


def test_tfrecords(p, tmp_path):
  read = p | tfrecords.ReadTFRecords(str(tmp_path / '*.tfrecord'))
  _is(read.records, KeyedBytes)
  _is(read.failed, DeadLetter)
  decoded = p | 'Decoded' >> beam.Create([('k', np.zeros((2, 2, 1), np.uint8))])
  _is(decoded | tfrecords.WriteImageExamples(str(tmp_path / 'img')), str)
  _is(_records(p) | tfrecords.WriteSequenceExamples(str(tmp_path / 'seq')), str)


def test_sequences(p, tmp_path):
  parsed = p | 'Raw' >> beam.Create([b'x']) | sequences.ParseSequenceExamples()
  _is(parsed.parsed, SequenceRecord)
  _is(parsed.failed, DeadLetter)
  read = p | sequences.ReadSequenceExamples(str(tmp_path / '*.tfrecord'))
  _is(read.parsed, SequenceRecord)
  _is(read.failed, DeadLetter)
  spec = EventSpec(value_fields=('v',))
  (tmp_path / 'e.jsonl').write_text('{}\n')
  events = p | sequences.ReadEvents(str(tmp_path / 'e.jsonl'), spec)
  _is(events.events, Event)
  _is(events.failed, DeadLetter)
  assembled = events.events | sequences.AssembleSequences()
  _is(assembled.sequences, SequenceRecord)
  _is(assembled.failed, DeadLetter)
  hashed = assembled.sequences | sequences.HashIds(16)
  _is(hashed.sequences, SequenceRecord)
  _is(hashed.failed, DeadLetter)
  _is(hashed.sequences | sequences.BucketByLength((4, 8), 2), PaddedBatch)
  _is(hashed.sequences | sequences.PadSequences(4, 2), PaddedBatch)
  _is(hashed.sequences | sequences.ChunkSequences(2), SequenceRecord)
  _is((p | 'Lines' >> beam.Create(['{}']) | 'Parse' >> sequences.ParseEvents(spec)).events, Event)


def test_windowing(p):
  stamped = _events(p) | windowing.EventTimestamps()
  _is(stamped, Event)
  spec = WindowSpec(kind='fixed', size=10.0)
  for label, transform in [
    ('Features', windowing.WindowedFeatures(spec, batch_path=False)),
    ('FeaturesBatch', windowing.WindowedFeatures(spec, batch_path=True)),
    ('FeaturesNoGate', windowing.WindowedFeatures(spec, route_late=False, batch_path=False)),
    ('Sequences', windowing.WindowedSequences(spec, 4)),
    ('Spectrograms', windowing.WindowedSpectrograms(spec, SpectrogramSpec(sample_rate=1.0, nperseg=4))),
  ]:
    out = stamped | label >> transform
    _is(out.records, Record)
    _is(out.late, Record)


def test_preprocessing(p, tmp_path):
  encoded = p | 'Encoded' >> beam.Create([('k.png', b'x')])
  raw_files = encoded | preprocessing.CanonicalImageFiles((4, 4, 1))
  _is(raw_files.raw, bytes)
  _is(raw_files.failed, DeadLetter)
  raw_records = encoded | preprocessing.CanonicalImageRecords((4, 4, 1))
  _is(raw_records.raw, bytes)
  raw_seq = _records(p) | preprocessing.CanonicalSequences(1, False)
  _is(raw_seq.raw, bytes)
  _is(raw_seq.failed, DeadLetter)
  applied = encoded | preprocessing.ApplySavedTransform(str(tmp_path))
  _is(applied.transformed, KeyedFeatures)
  _is(applied.failed, DeadLetter)
  instances = p | 'Instances' >> beam.Create([{'image': np.zeros(2)}])
  _is(instances | preprocessing.ExtractStats(), Record)
  config_lib.save(str(tmp_path / 'img'), config_lib.PreprocessConfig(kind='images'))
  inputs = encoded | 'ForInference' >> preprocessing.TransformImagesForInference(str(tmp_path / 'img'))
  _is(inputs.inputs, KeyedArray)
  _is(inputs.failed, DeadLetter)
  config_lib.save(str(tmp_path / 'seq'), config_lib.PreprocessConfig(kind='sequences'))
  seq_inputs = _records(p, 'Records2') | 'SeqForInference' >> preprocessing.TransformSequencesForInference(
    str(tmp_path / 'seq'), ['values']
  )
  _is(seq_inputs.inputs, KeyedArray)


def test_writers_drift_and_metrics(p, tmp_path):
  features = p | 'Features' >> beam.Create([{'x': 1.0}, {'x': 2.0}])
  _is(features | io.WriteJsonLines(str(tmp_path / 'out')), str)
  _is(features | drift_t.BuildDriftProfile(str(tmp_path / 'profile.json')), str)
  from beam_dl.operations import drift

  profile = drift.build_profile({'x': [1.0, 2.0, 3.0]}, 4, 'test')
  out = features | drift_t.ComputeDrift(profile)
  _is(out.reports, Record)
  _is(out.alerts, Record)
  dead = p | 'Dead' >> beam.Create([{'key': 'k', 'stage': 's', 'reason': 'r'}])
  dead | metrics.CountDeadLetters()  # input type accepted


def test_beam_dl_transforms(p):
  from beam_dl.features.batch_windows import FeaturesByKeyBlock
  from beam_dl.operations.registry_mlflow import WatchModelAlias

  _is(_events(p) | FeaturesByKeyBlock(WindowSpec(kind='fixed', size=10.0)), Record)
  _is(p | WatchModelAlias('m', 'champion', stop_timestamp=1.0), ModelMetadata)


def test_wrong_input_refused_at_construction(p):
  ints = p | 'Ints' >> beam.Create([1, 2, 3])
  with pytest.raises(TypeCheckError, match='DecodeImages'):
    ints | images.DecodeImages()
  with pytest.raises(TypeCheckError, match='BucketByLength'):
    ints | sequences.BucketByLength((4,), 2)
  events = _events(p)
  with pytest.raises(TypeCheckError, match='HashIds'):
    events | sequences.HashIds(8)  # Events, not SequenceRecords
  with pytest.raises(TypeCheckError, match='WindowedFeatures'):
    _records(p) | windowing.WindowedFeatures(WindowSpec(kind='fixed', size=1.0))
  with pytest.raises(TypeCheckError, match='ApplySavedTransform'):
    ints | preprocessing.ApplySavedTransform('/nonexistent')


def test_declared_types_survive_a_run(tmp_path):
  """Coders come from the declared types: a small pipeline still runs end to end."""
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that, equal_to

  spec = EventSpec(value_fields=('v',))
  with TestPipeline(runner='FnApiRunner') as p:
    lines = p | beam.Create([b'{"key": "a", "time": 1, "v": 1}', b'{"key": "a", "time": 2, "v": 2}', b'bad'])
    events = lines | sequences.ParseEvents(spec)
    seqs = events.events | sequences.AssembleSequences()
    batches = seqs.sequences | sequences.PadSequences(4, 2)
    assert_that(batches | beam.Map(lambda b: (b.keys, int(b.mask.sum()))), equal_to([(['a'], 2)]), label='Batches')
    assert_that(events.failed | beam.Map(lambda d: d['stage']), equal_to(['parse_event']), label='Failed')
