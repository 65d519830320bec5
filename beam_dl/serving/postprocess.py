"""Model outputs -> JSON-serialisable records (pure functions, no Beam)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from apache_beam.ml.inference.base import PredictionResult


def softmax(logits: np.ndarray) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  exp = np.exp(logits - logits.max())  # the method, not np.max: a tenth of the per-record cost
  exp /= exp.sum()
  return exp


def classification_record(key: Any, result: PredictionResult, labels: Sequence[str] | None = None) -> dict[str, Any]:
  """{"key", "label", "score", "scores"} from one classifier's logits.

  `label` is the class index; `label_name` is added when the model has labels.
  """
  scores = softmax(result.inference).tolist()  # Python floats: cheaper to index, round and encode
  label = max(range(len(scores)), key=scores.__getitem__)  # the first maximum, as np.argmax
  record = {
    'key': key,
    'label': label,
    'score': scores[label],
    'scores': [round(s, 6) for s in scores],
  }
  if labels:
    record['label_name'] = labels[label]
  return record
