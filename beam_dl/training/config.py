"""Experiment configuration: plain dataclasses, one file per experiment.

A config file in `pipelines/configs/` defines `get_config(variant=None)`
returning a `TrainConfig`; nothing here knows about a particular model or
data set. The mesh shape and the rules mapping the models' logical axis
names to mesh axes live here (`ShardingConfig`), never in the models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

# Logical axis names used by beam_dl.models, mapped to mesh axes per mode.
# A rule whose mesh axis is already used in the same array (or does not divide
# the dimension) falls through to replication, so one rule list serves every
# model. 'batch' is the activation/batch axis.
_DP_RULES = (('batch', 'data'),)
_FSDP_RULES = (
  ('batch', 'data'),
  ('conv_out', 'data'),
  ('mlp', 'data'),
  ('embed', 'data'),
  ('rnn_hidden', 'data'),
  ('vocab', 'data'),
)
_TENSOR_RULES = (
  ('batch', 'data'),
  ('conv_out', 'model'),
  ('mlp', 'model'),
  ('rnn_hidden', 'model'),
)
_FSDP_TENSOR_RULES = (
  ('batch', 'data'),
  ('conv_out', 'model'),
  ('mlp', 'model'),
  ('rnn_hidden', 'model'),
  ('conv_in', 'data'),
  ('embed', 'data'),
  ('rnn_in', 'data'),
  ('rnn_state', 'data'),
  ('vocab', 'data'),
)
DEFAULT_RULES = {
  'dp': _DP_RULES,
  'fsdp': _FSDP_RULES,
  'tensor': _TENSOR_RULES,
  'fsdp_tensor': _FSDP_TENSOR_RULES,
  'pmap': _DP_RULES,
}


@dataclasses.dataclass
class ShardingConfig:
  """How parameters, optimizer state and batches are laid out on devices.

  Attributes:
    mode: 'dp' (replicated params, batch split over 'data'), 'fsdp' (params
      and optimizer state also split over 'data'), 'tensor' (wide layers
      split over 'model'), 'fsdp_tensor' (both), or 'pmap' (the legacy
      `jax.pmap` data-parallel path).
    model_parallelism: size of the 'model' mesh axis; 'data' gets the rest.
    rules: logical->mesh axis rules; None takes `DEFAULT_RULES[mode]`.
  """

  mode: str = 'dp'
  model_parallelism: int = 1
  rules: Sequence[tuple[str, str | None]] | None = None

  def logical_rules(self):
    if self.mode not in DEFAULT_RULES:
      raise ValueError(f'sharding mode must be one of {sorted(DEFAULT_RULES)}, got {self.mode!r}')
    return tuple(self.rules) if self.rules is not None else DEFAULT_RULES[self.mode]


@dataclasses.dataclass
class DataConfig:
  """Where examples come from and how one example looks.

  Attributes:
    kind: 'images' (tf.train.Example with image/raw, image/shape, label),
      'sequences' (tf.train.SequenceExample with values, label or target), or
      'transformed' (the tf.Examples `pipelines.preprocess` writes, parsed
      with the feature spec of `transform_dir`'s tf.Transform output).
    train_files / eval_files: glob patterns of TFRecord shards.
    shape: one example's shape: (H, W, C) for images, (None, F) for sequences.
    max_len: sequences are cut/padded to this many steps; with 'transformed',
      > 0 makes `features` per-step (variable-length) columns of a sequence.
    target: 'label' (int class) or 'target' (float regression value(s)).
    num_targets: regression target width.
    shuffle_buffer: tf.data shuffle buffer (examples).
    prefetch: batches kept in flight on the devices.
    transform_dir: 'transformed': the tf.Transform output directory.
    features: 'transformed': the transformed features that make the model
      input, in order: fixed-length ones are concatenated and reshaped to
      `shape`; per-step ones (max_len > 0) are stacked into [T, F].
    label_feature: 'transformed': the feature fed as `target` ('label' or
      'target').
    process_split: how the processes of a multi-process run share the data.
      'files': each reads `files[process_index::process_count]` (no example
      read twice; write a multiple of process_count shards of equal size so
      every process has the same number of examples per epoch). 'batch':
      each reads every file in the same seeded order and keeps its slice of
      each global batch, so the global batches do not depend on the number of
      processes (reproducible across topologies, at N times the reading).
  """

  kind: str = 'images'
  train_files: str = ''
  eval_files: str = ''
  shape: Sequence[int | None] = (8, 8, 1)
  max_len: int = 0
  target: str = 'label'
  num_targets: int = 1
  shuffle_buffer: int = 10_000
  prefetch: int = 2
  transform_dir: str = ''
  features: Sequence[str] = ()
  label_feature: str = 'label'
  process_split: str = 'files'

  @property
  def is_sequence(self) -> bool:
    """Examples are [T, F] steps with a mask (the model takes (x, mask))."""
    return self.kind == 'sequences' or (self.kind == 'transformed' and self.max_len > 0)


@dataclasses.dataclass
class CompressionConfig:
  """Compression while training (`beam_dl.compression`); all off by default.

  Attributes:
    qat: 'int8' trains with qwix fake quantization (int8 weights and
      activations, straight-through gradients) and also exports
      WORKDIR/model_int8, the post-training-quantized model dir.
    prune_sparsity: final fraction of zero weights in every kernel (0: off;
      e.g. 0.5-0.9).
    prune_start_step / prune_end_step: the cubic sparsity ramp; end 0 means
      75% of num_steps.
    prune_every: steps between mask updates.
    prune_exclude: regexes of kernel paths left dense (e.g. ('conv_init',
      'head') keeps a ResNet's stem and classifier dense).
    teacher_dir: a trained model dir: the student learns from its softened
      outputs plus the labels.
    distill_temperature: softmax temperature for the teacher and student.
    distill_weight: weight of the soft loss (1 - weight on the labels).
    distill_loss: classification soft loss: 'kl' (softened outputs,
      Hinton et al.) or 'logits_mse' (match the teacher's logits, Ba &
      Caruana); regression always matches the teacher's outputs by MSE.
    distill_mixup: > 0: the student and teacher see mixup blends of the
      training inputs (lambda ~ Beta(a, a)), which the teacher labels:
      "function matching" on new inputs (Beyer et al. 2022). The blends
      have no labels, so it needs distill_weight=1.
  """

  qat: str = ''
  prune_sparsity: float = 0.0
  prune_start_step: int = 0
  prune_end_step: int = 0
  prune_every: int = 10
  prune_exclude: Sequence[str] = ()
  teacher_dir: str = ''
  distill_temperature: float = 2.0
  distill_weight: float = 0.5
  distill_loss: str = 'kl'
  distill_mixup: float = 0.0


@dataclasses.dataclass
class TrainConfig:
  """One experiment: model, data, optimisation, sharding, checkpointing.

  `model_kwargs` must be JSON-serialisable: they are stored in the exported
  `ModelSpec` so the serving handler rebuilds the same module by name.
  """

  model: str = 'small_cnn'
  model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  task: str = 'classification'  # or 'regression'
  labels: Sequence[str] | None = None
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  input_dtype: str = 'uint8'
  input_scale: float = 1.0
  input_offset: float = 0.0
  sharding: ShardingConfig = dataclasses.field(default_factory=ShardingConfig)
  compression: CompressionConfig = dataclasses.field(default_factory=CompressionConfig)
  # A saved beam_dl model dir (same architecture) whose params and batch
  # stats start the run instead of a fresh init: fine-tuning, pruning or QAT
  # from a trained float model. A WORKDIR with a checkpoint resumes from that.
  init_dir: str = ''

  batch_size: int = 64  # global batch per step (per micro-step with grad_accum)
  eval_batch_size: int = 256
  num_steps: int = 1000
  optimizer: str = 'adamw'  # 'adamw' | 'adam' | 'sgd' (momentum 0.9, nesterov)
  learning_rate: float = 1e-3
  schedule: str = 'cosine'  # 'cosine' | 'constant' | 'linear'
  warmup_steps: int = 0
  weight_decay: float = 0.0
  grad_clip: float = 0.0
  grad_accum_steps: int = 1  # optax.MultiSteps: one update every k micro-steps
  label_smoothing: float = 0.0
  focal_gamma: float = 0.0  # >0: focal loss for long-tailed classes

  seed: int = 0
  log_every: int = 50
  eval_every: int = 0  # 0: only at the end
  checkpoint_every: int = 0  # 0: only at the end
  keep_checkpoints: int = 2

  def replace(self, **changes) -> 'TrainConfig':
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
