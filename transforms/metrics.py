"""Counting what a pipeline's outputs hold, as Beam metrics for Prometheus.

  CountDeadLetters()   dead letters -> counter `dead_letters{stage=...,reason=...}`

`beam_dl.operations.metrics_export` turns the labelled counter into
`beam_dl_deadletters_dead_letters_total{stage="decode", reason="ImageDecodeError"}`.
"""

from __future__ import annotations

import re

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_dl.core.element_types import DeadLetter
from beam_dl.operations.metrics_export import labelled

NAMESPACE = 'beam_dl.deadletters'
_TYPE = re.compile(r'^([A-Za-z_][A-Za-z0-9_.]*)\s*:')
_WORD = re.compile(r'[A-Za-z]+')


def reason_kind(reason: str, max_words: int = 4) -> str:
  """A dead letter's reason as a low-cardinality label.

  'Type: message' (`beam_dl.core.deadletter.describe`) -> the exception type;
  otherwise the leading plain words, up to the first number, bracket or
  colon ('not a recognised image format' -> 'not_a_recognised_image'), so
  keys and sizes in messages don't make a label value per element.
  """
  text = str(reason or '').strip()
  match = _TYPE.match(text)
  if match:
    return match.group(1).rsplit('.', 1)[-1]
  words = []
  for token in text.split()[:max_words]:
    if not _WORD.fullmatch(token):
      break
    words.append(token.lower())
  return '_'.join(words) or 'other'


class _CountFn(beam.DoFn):
  def process(self, record):
    stage = str(record.get('stage') or 'unknown')
    Metrics.counter(NAMESPACE, labelled('dead_letters', stage=stage, reason=reason_kind(record.get('reason')))).inc()
    return ()


@beam.typehints.with_input_types(DeadLetter)
class CountDeadLetters(beam.PTransform):
  """Counts dead letters ({"key", "stage", "reason"}) by stage and reason kind; outputs nothing."""

  def expand(self, dead_letters):
    return dead_letters | 'Count' >> beam.ParDo(_CountFn())
