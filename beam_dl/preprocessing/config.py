"""`PreprocessConfig`: which preprocessing a transform directory holds.

Written next to the transform graph (`<transform_dir>/preprocess.json`) so the
serving side rebuilds the same canonical raw examples (image size, number of
value columns) from the transform directory alone.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

from beam_dl.preprocessing import preprocessing_fns, schemas

CONFIG_FILE = 'preprocess.json'
KINDS = ('images', 'sequences')


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """The raw schema and `preprocessing_fn` of one preprocessing run.

  Attributes:
    kind: 'images' or 'sequences'.
    image_shape: (H, W, C) every image is decoded/resized to (images).
    num_values: F, numeric features per step (sequences).
    with_ids: sequences carry a categorical id per step.
    scaling: 'z_score' or '0_1' for pixels / value columns.
    num_length_buckets: quantile buckets of sequence length.
  """

  kind: str = 'images'
  image_shape: tuple[int, int, int] = (8, 8, 1)
  num_values: int = 1
  with_ids: bool = False
  scaling: str = 'z_score'
  num_length_buckets: int = 4

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}, got {self.kind!r}')
    if self.scaling not in preprocessing_fns.SCALINGS:
      raise ValueError(f'scaling must be one of {preprocessing_fns.SCALINGS}, got {self.scaling!r}')
    object.__setattr__(self, 'image_shape', tuple(int(d) for d in self.image_shape))
    if len(self.image_shape) != 3 or min(self.image_shape) < 1:
      raise ValueError(f'image_shape must be (H, W, C) of positive sizes, got {self.image_shape}')
    if self.kind == 'sequences' and self.num_values < 1:
      raise ValueError(f'num_values must be >= 1, got {self.num_values}')

  def feature_spec(self) -> dict:
    if self.kind == 'images':
      return schemas.image_feature_spec()
    return schemas.sequence_feature_spec(self.num_values, self.with_ids)

  def preprocessing_fn(self) -> Callable:
    if self.kind == 'images':
      return preprocessing_fns.image_preprocessing_fn(self.image_shape, self.scaling)
    return preprocessing_fns.sequence_preprocessing_fn(
      self.num_values, with_ids=self.with_ids, scaling=self.scaling, num_length_buckets=self.num_length_buckets
    )

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> 'PreprocessConfig':
    return cls(**json.loads(text))


def save(transform_dir: str, config: PreprocessConfig) -> None:
  from apache_beam.io.filesystems import FileSystems

  if not FileSystems.exists(transform_dir):
    FileSystems.mkdirs(transform_dir)
  with FileSystems.create(FileSystems.join(transform_dir, CONFIG_FILE)) as f:
    f.write(config.to_json().encode('utf-8'))


def load(transform_dir: str) -> PreprocessConfig:
  from apache_beam.io.filesystems import FileSystems

  path = FileSystems.join(transform_dir, CONFIG_FILE)
  if not FileSystems.exists(path):
    raise FileNotFoundError(f'{transform_dir!r} has no {CONFIG_FILE}: not written by pipelines.preprocess')
  with FileSystems.open(path) as f:
    return PreprocessConfig.from_json(f.read().decode('utf-8'))
