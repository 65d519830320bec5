"""The model directory format: round trips and clear errors."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from beam_dl.models import checkpoints
from beam_dl.models.checkpoints import CheckpointError, ModelSpec
from tests.models import save_broken_model, seeded_variables

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
  save_broken_model(tmp_path / 'm', SPEC, b'\x00garbage')
  with pytest.raises(CheckpointError, match='cannot decode'):
    checkpoints.load(str(tmp_path / 'm'))
  raw = json.loads(SPEC.to_json()) | {'surprise': 1}
  (tmp_path / 'm' / 'spec.json').write_text(json.dumps(raw))
  with pytest.raises(CheckpointError, match='surprise'):
    checkpoints.load_spec(str(tmp_path / 'm'))


@pytest.mark.parametrize(
  'leaf, says',
  [
    (lambda kernel: [[str(x) for x in row] for row in kernel.tolist()], r"\['kernel'\]\[0\]\[0\] has dtype <U"),
    (lambda kernel: b'weights', r"\['kernel'\] has dtype \|S7"),
  ],
)
def test_variables_that_are_not_numbers_are_refused_at_load(tmp_path, leaf, says):
  """msgpack restores what was written: strings where numbers belong load,
  then fail every batch that reaches the model; load refuses them."""
  from flax import serialization

  variables = seeded_variables(SPEC)
  kernel = np.asarray(variables['params']['Dense_0']['kernel'])
  bad = {'params': {**variables['params'], 'Dense_0': {**variables['params']['Dense_0'], 'kernel': leaf(kernel)}}}
  directory = save_broken_model(tmp_path / 'm', SPEC, serialization.msgpack_serialize(bad))
  with pytest.raises(CheckpointError, match=rf"{directory}: variable \['params'\]\['Dense_0'\]{says}"):
    checkpoints.load(directory)


@pytest.mark.parametrize('depth', [checkpoints.MAX_SPEC_DEPTH + 1, 100_000])
def test_a_deeply_nested_spec_is_refused_in_one_line(depth):
  nested = '{"name": "small_cnn", "extra": {"a": ' + '[' * (depth - 2) + ']' * (depth - 2) + '}}'
  with pytest.raises(CheckpointError, match=f'nested more than {checkpoints.MAX_SPEC_DEPTH} levels deep'):
    ModelSpec.from_json(nested)
  ModelSpec.from_json(json.dumps(json.loads(SPEC.to_json()) | {'extra': {'a': [[[1]]]}}))  # ordinary nesting loads


def test_unknown_model_name_lists_registered_models():
  with pytest.raises(ValueError, match='small_cnn'):
    ModelSpec('no_such_model').build()


def spec_json(**changes):
  return json.dumps(json.loads(SPEC.to_json()) | changes)


@pytest.mark.parametrize(
  'changes, field',
  [
    ({'name': 'no_such_model'}, 'name'),
    ({'input_shape': [8, 0, 1]}, 'input_shape'),
    ({'input_shape': [8, '8', 1]}, 'input_shape'),
    ({'input_shape': []}, 'input_shape'),
    ({'input_dtype': 'uint9'}, 'input_dtype'),
    ({'input_dtype': 7}, 'input_dtype'),
    ({'input_scale': 'a lot'}, 'input_scale'),
    ({'input_offset': None}, 'input_offset'),
    ({'labels': ['a', 'b']}, 'labels'),  # 2 labels, num_classes 4
    ({'labels': [1, 2, 3, 4]}, 'labels'),
    ({'kwargs': {'num_classes': 4, 'no_such_argument': 1}}, 'kwargs'),
    ({'kwargs': [4]}, 'kwargs'),
  ],
)
def test_bad_spec_fields_are_named(tmp_path, changes, field):
  (tmp_path / 'spec.json').write_text(spec_json(**changes))
  with pytest.raises(CheckpointError) as error:
    checkpoints.load_spec(str(tmp_path))
  message = str(error.value)
  assert message.startswith(str(tmp_path / 'spec.json')) and f"field '{field}'" in message


def test_spec_that_is_not_a_json_object(tmp_path):
  for text, says in (('{"name": ', 'not JSON'), ('[1, 2]', 'JSON object'), ('{}', "field 'name'")):
    (tmp_path / 'spec.json').write_text(text)
    with pytest.raises(CheckpointError, match=says):
      checkpoints.load_spec(str(tmp_path))


def test_good_specs_pass_validation():
  checkpoints.validate_spec(SPEC)
  checkpoints.validate_spec(ModelSpec('small_cnn', {'num_classes': 2}, [8, 8, 1], labels=['no', 'yes']))
  checkpoints.validate_spec(ModelSpec('rnn', {'cell': 'gru', 'num_outputs': 2}, (None, 3), labels=['a', 'b']))


def other_variables(**kwargs):
  spec = ModelSpec('small_cnn', {'num_classes': 4, 'features': [4], 'hidden': 8} | kwargs, (8, 8, 1))
  return seeded_variables(spec)


@pytest.mark.parametrize('fmt', ['orbax', 'msgpack'])
def test_variables_that_do_not_match_the_spec_fail_to_load(tmp_path, fmt):
  good = other_variables()
  wrong_shape = other_variables(hidden=16)  # same arrays, other shapes
  missing = {'params': {k: v for k, v in good['params'].items() if k != 'Dense_1'}}
  extra = {'params': {**good['params'], 'Surplus': {'kernel': np.zeros((2, 2), np.float32)}}}
  for name, variables, says in (
    ('wrong_shape', wrong_shape, r"\['params'\]\['Dense_0'\]\['kernel'\] has shape \(\d+, 16\), expected \(\d+, 8\)"),
    ('missing', missing, r"missing \['params'\]\['Dense_1'\]\['kernel'\]"),
    ('extra', extra, r"unexpected \['params'\]\['Surplus'\]\['kernel'\] \(2, 2\)"),
  ):
    model_dir = str(tmp_path / name)
    checkpoints.save(model_dir, SPEC, variables, fmt=fmt)
    with pytest.raises(CheckpointError, match='variables do not match spec.json') as error:
      checkpoints.load(model_dir)
    assert error.match(says)


@pytest.mark.parametrize('first,second', [('orbax', 'msgpack'), ('msgpack', 'orbax')])
def test_saving_over_a_model_of_the_other_format_replaces_it(tmp_path, first, second):
  """Two runs sharing a model dir: the second model is the one that loads,
  and only its weights are left (no stale variables/ beside variables.msgpack)."""
  module = SPEC.build()
  old = module.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
  new = module.init(jax.random.key(1), np.zeros((1, 8, 8, 1), np.float32))
  model_dir = str(tmp_path / 'm')
  checkpoints.save(model_dir, SPEC, old, fmt=first)
  checkpoints.save(model_dir, SPEC, new, fmt=second)
  assert sorted(os.listdir(model_dir)) == sorted(
    [checkpoints.SPEC_FILE, {'orbax': checkpoints.ORBAX_DIR, 'msgpack': checkpoints.MSGPACK_FILE}[second]]
  )
  _, restored = checkpoints.load(model_dir)
  x = np.random.default_rng(0).random((3, 8, 8, 1), np.float32)
  np.testing.assert_allclose(module.apply(nn.meta.unbox(new), x), module.apply(restored, x), rtol=1e-6)
