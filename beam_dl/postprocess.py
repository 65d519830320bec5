"""Model outputs -> JSON-serialisable records (pure functions, no Beam)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from apache_beam.ml.inference.base import PredictionResult


def softmax(logits: np.ndarray) -> np.ndarray:
  shifted = np.asarray(logits, np.float64) - np.max(logits)
  exp = np.exp(shifted)
  return exp / exp.sum()


def classification_record(
    key: Any, result: PredictionResult, labels: Sequence[str] | None = None
) -> dict[str, Any]:
  """{"key", "label", "score", "scores"} from one classifier's logits.

  `label` is the class index; `label_name` is added when the model has labels.
  """
  scores = softmax(result.inference)
  label = int(np.argmax(scores))
  record = {
      'key': key,
      'label': label,
      'score': float(scores[label]),
      'scores': [round(float(s), 6) for s in scores],
  }
  if labels:
    record['label_name'] = labels[label]
  return record
