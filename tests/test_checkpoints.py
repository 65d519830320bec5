"""The model directory format: round trips and clear errors."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from beam_dl import checkpoints
from beam_dl.checkpoints import CheckpointError, ModelSpec

SPEC = ModelSpec('small_cnn', {'num_classes': 4, 'features': [4], 'hidden': 8}, (8, 8, 1), 'uint8', 1 / 255)


@pytest.mark.parametrize('fmt', ['orbax', 'msgpack'])
def test_round_trip_gives_same_model_outputs(tmp_path, fmt):
  module = SPEC.build()
  variables = module.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
  checkpoints.save(str(tmp_path / 'm'), SPEC, variables, fmt=fmt)
  spec, restored = checkpoints.load(str(tmp_path / 'm'))
  assert spec == SPEC
  x = np.random.default_rng(0).random((3, 8, 8, 1), np.float32)
  np.testing.assert_allclose(module.apply(nn.meta.unbox(variables), x), module.apply(restored, x), rtol=1e-6)


def test_missing_directory_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match='no spec.json'):
    checkpoints.load(str(tmp_path))


def test_spec_without_variables_is_a_clear_error(tmp_path):
  os.makedirs(tmp_path / 'm')
  (tmp_path / 'm' / 'spec.json').write_text(SPEC.to_json())
  with pytest.raises(CheckpointError, match='no variables'):
    checkpoints.load(str(tmp_path / 'm'))


def test_corrupt_msgpack_and_unknown_spec_fields(tmp_path):
  checkpoints.save(str(tmp_path / 'm'), SPEC, SPEC.build().init(jax.random.key(0), np.zeros((1, 8, 8, 1))), fmt='msgpack')
  (tmp_path / 'm' / 'variables.msgpack').write_bytes(b'\x00garbage')
  with pytest.raises(CheckpointError, match='cannot decode'):
    checkpoints.load(str(tmp_path / 'm'))
  raw = json.loads(SPEC.to_json()) | {'surprise': 1}
  (tmp_path / 'm' / 'spec.json').write_text(json.dumps(raw))
  with pytest.raises(CheckpointError, match='surprise'):
    checkpoints.load_spec(str(tmp_path / 'm'))


def test_unknown_model_name_lists_registered_models():
  with pytest.raises(ValueError, match='small_cnn'):
    ModelSpec('no_such_model').build()
