"""Post-training int8 quantization of beam_dl model directories, with qwix.

Why qwix: it is Google's Flax-native quantization library (PTQ, QAT and
static-range calibration behind one set of rules), it intercepts
`lax.conv_general_dilated` / `lax.dot_general` inside unmodified Linen
modules, and its serving path computes int8 x int8 -> int32 convolutions and
matmuls (XLA's int8 kernels on GPU/TPU). AQT (aqtp) needs its own layer
classes in the model code; jaxpruner is not served by PyPI here.

Two methods, both recorded in `spec.json` under `quantization`:

  'qwix_ptq'     the module is wrapped with `qwix.quantize_model(base,
                 PtqProvider(rules))`: conv and dense kernels are int8 with a
                 float32 scale per output channel, activations int8 with scales
                 calibrated on a sample of training data ('static'), computed
                 per batch ('dynamic') or, for dense layers only, left float
                 ('none'; qwix's conv needs int8 activations, so convolutions
                 then quantize them dynamically). CNNs (SmallCNN, ResNet).
  'weight_only'  every kernel/embedding (ndim >= 2) is stored int8 with a
                 per-output-channel scale (`qwix.quantize`) and dequantized
                 when the model is loaded; compute stays float. For the RNNs:
                 qwix's PTQ cannot create its int8 params inside `nn.scan`
                 (broadcast params), and `OptimizedLSTMCell` concatenates its
                 kernels before the matmul, so no op there sees a weight.

On disk both are plain arrays (flax `to_state_dict` of qwix's `WithAux` /
`QArray`: `kernel/array/qvalue` int8 + `kernel/array/scale` float32 for
'qwix_ptq'; `kernel/qvalue` + `kernel/scale` for 'weight_only'), written by
orbax or msgpack like any model. `beam_dl.models.checkpoints` calls `wrap_module`
when it builds the module and `restore_variables` when it loads the
variables, so the handler, `ClassifyImages` and every pipeline serve a
quantized directory with no special case; `restore_variables` refuses
variables that do not match the declared quantization, naming file and field.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from beam_dl.models.errors import CheckpointError

METHODS = ('qwix_ptq', 'weight_only')
ACTIVATIONS = ('static', 'dynamic', 'none')
WEIGHT_DTYPES = ('int8',)
_FIELDS = {'method', 'weight_dtype', 'activations', 'calibration_examples', 'library'}
log = logging.getLogger(__name__)


class QuantizationError(CheckpointError):
  """Quantization metadata in spec.json that is unknown or does not match
  the stored variables; the message names the file and the field."""


def check_metadata(quantization: Mapping[str, Any], source: str = 'spec.json') -> None:
  """Raises QuantizationError unless `quantization` is a known, complete record."""
  if not isinstance(quantization, Mapping):
    raise QuantizationError(f'{source}: field "quantization" must be an object, got {quantization!r}')
  unknown = set(quantization) - _FIELDS
  if unknown:
    raise QuantizationError(f'{source}: unknown fields in "quantization": {sorted(unknown)}')
  checks = (('method', METHODS), ('weight_dtype', WEIGHT_DTYPES), ('activations', ACTIVATIONS))
  for field, allowed in checks:
    if quantization.get(field) not in allowed:
      raise QuantizationError(
        f'{source}: field "quantization.{field}" is {quantization.get(field)!r}, expected one of {list(allowed)}'
      )
  if quantization['method'] == 'weight_only' and quantization['activations'] != 'none':
    raise QuantizationError(f"{source}: field \"quantization.activations\" must be 'none' with method 'weight_only'")


def _rules(quantization: Mapping[str, Any], *, training: bool = False):
  import qwix

  act = quantization.get('activations', 'dynamic')
  static = act == 'static' and not training
  rule = qwix.QtRule if training else qwix.QuantizationRule
  dtype = quantization.get('weight_dtype', 'int8')
  return [
    rule(
      module_path='.*', op_names=('conv_general_dilated',), weight_qtype=dtype, act_qtype=dtype, act_static_scale=static
    ),
    rule(
      module_path='.*',
      op_names=('dot_general', 'einsum'),
      weight_qtype=dtype,
      act_qtype=None if act == 'none' else dtype,
      act_static_scale=static if act != 'none' else None,
    ),
  ]


def wrap_module(module: nn.Module, quantization: Mapping[str, Any] | None) -> nn.Module:
  """The module that serves `quantization` (the `ModelSpec.build` hook)."""
  if not quantization or quantization.get('method') == 'weight_only':
    return module
  import qwix

  return qwix.quantize_model(module, qwix.PtqProvider(_rules(quantization)))


def qat_module(module: nn.Module, weight_dtype: str = 'int8') -> nn.Module:
  """`module` with qwix fake quantization (int8 weights and activations,
  straight-through gradients) for quantization-aware training. Its parameter
  tree is the float module's, so the result exports and converts like any
  trained model."""
  import qwix

  rules = _rules({'weight_dtype': weight_dtype, 'activations': 'dynamic'}, training=True)
  return qwix.quantize_model(module, qwix.QtProvider(rules))


def _abstract_float(spec) -> Any:
  module = spec.build_float()
  return nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *spec.example_inputs()))


def _abstract_qwix(spec) -> Any:
  """The qwix PTQ variable tree (WithAux/QArray leaves, shapes only)."""
  module = spec.build()
  return nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *spec.example_inputs()))


def _weight_only_layout(float_tree: Any) -> Any:
  """{'qvalue', 'scale'} in place of every params leaf with ndim >= 2."""

  def leaf(path, x):
    if path[0] == 'params' and len(x.shape) >= 2:
      scale = (1,) * (len(x.shape) - 1) + (x.shape[-1],)
      return {'qvalue': jax.ShapeDtypeStruct(x.shape, jnp.int8), 'scale': jax.ShapeDtypeStruct(scale, jnp.float32)}
    return x

  flat = flax.traverse_util.flatten_dict(serialization.to_state_dict(float_tree))
  return flax.traverse_util.unflatten_dict({p: leaf(p, x) for p, x in flat.items()})


def _flat(tree) -> dict[str, Any]:
  flat = flax.traverse_util.flatten_dict(serialization.to_state_dict(tree), sep='/')
  return {k: v for k, v in flat.items() if v is not None}


def stored_layout(spec) -> dict[str, jax.ShapeDtypeStruct]:
  """'path/to/leaf' -> expected shape and dtype of every stored array."""
  method = spec.quantization['method']
  tree = _abstract_qwix(spec) if method == 'qwix_ptq' else _weight_only_layout(_abstract_float(spec))
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _flat(tree).items()}


def check_variables(spec, variables: Any, source: str) -> None:
  """Raises QuantizationError when the stored arrays in `source` do not match
  `spec.quantization` (an int8 array stored as float, a missing or misshapen
  scale, a layer missing or extra)."""
  check_metadata(spec.quantization)
  expected = stored_layout(spec)
  got = _flat(variables)
  declared = f'spec.json declares quantization {dict(spec.quantization)}'
  for name in sorted(got):
    parts = sorted(k for k in expected if k.startswith(name + '/'))
    if parts:
      raise QuantizationError(
        f'{source}: field "{name}" is a plain {np.asarray(got[name]).dtype} array, expected the '
        f'quantized fields {parts} ({declared})'
      )
  missing = sorted(set(expected) - set(got))
  if missing:
    raise QuantizationError(f'{source}: field "{missing[0]}" is missing ({declared}); {len(missing)} missing in all')
  extra = sorted(set(got) - set(expected))
  if extra:
    raise QuantizationError(f'{source}: field "{extra[0]}" is not part of the quantized model ({declared})')
  for name, want in expected.items():
    have = np.asarray(got[name])
    if have.dtype != want.dtype:
      raise QuantizationError(f'{source}: field "{name}" is {have.dtype}, expected {want.dtype} ({declared})')
    if tuple(have.shape) != tuple(want.shape):
      raise QuantizationError(
        f'{source}: field "{name}" has shape {tuple(have.shape)}, expected {tuple(want.shape)} ({declared})'
      )


def restore_variables(spec, variables: Any, source: str) -> Any:
  """Variables ready for `spec.build().apply` from the stored plain arrays
  (the `beam_dl.models.checkpoints.load` hook): checked, then qwix's WithAux/QArray
  tree ('qwix_ptq') or float kernels dequantized with qwix ('weight_only')."""
  import qwix

  check_variables(spec, variables, source)
  if spec.quantization['method'] == 'qwix_ptq':
    return serialization.from_state_dict(_abstract_qwix(spec), serialization.to_state_dict(variables))

  def dequantize(node):
    if isinstance(node, Mapping) and set(node) == {'qvalue', 'scale'}:
      q = qwix.QArray(qvalue=jnp.asarray(node['qvalue']), scale=jnp.asarray(node['scale']), qtype=jnp.int8)
      return np.asarray(qwix.dequantize(q))
    if isinstance(node, Mapping):
      return {k: dequantize(v) for k, v in node.items()}
    return node

  return dequantize(serialization.to_state_dict(variables))


def _qwix_covers(spec, activations: str) -> bool:
  """True when qwix's PTQ wraps the model and turns every kernel (params
  leaf with ndim >= 2) into int8. False for the scanned RNNs: Flax refuses
  params created inside `nn.scan`, and `OptimizedLSTMCell`'s kernels reach
  its matmul concatenated, so qwix would leave them float."""
  probe = dataclasses.replace(spec, quantization={'method': 'qwix_ptq', 'activations': activations})
  try:
    quantized = _flat(_abstract_qwix(probe))
  except ValueError as e:  # e.g. broadcasted variable has a data dependency on the scan body
    log.info('qwix PTQ cannot wrap %s: %s', spec.name, e)
    return False
  kernels = [k for k, v in _flat(_abstract_float(spec)).items() if k.startswith('params/') and len(v.shape) >= 2]
  left = [k for k in kernels if f'{k}/array/qvalue' not in quantized]
  if left:
    log.info('qwix PTQ leaves %d kernels of %s float (%s...)', len(left), spec.name, left[0])
  return not left


def _calibration_stats(spec, variables, batches: Iterable[Sequence[np.ndarray]]) -> tuple[Any, int]:
  """qwix's running activation statistics over calibration batches."""
  import qwix

  module = qwix.quantize_model(
    spec.build_float(), qwix.QtProvider(_rules({**spec.quantization, 'activations': 'static'}, training=False))
  )
  # Not jitted: qwix updates its statistics inside a custom_vjp, which leaks
  # tracers under jit; calibration is a handful of batches.
  variables = jax.tree_util.tree_map(jnp.asarray, variables)  # qwix finds weights by identity
  stats, seen = {}, 0
  for batch in batches:
    args = (spec.normalize(jnp.asarray(batch[0])),) + tuple(jnp.asarray(a) for a in batch[1:])
    _, updates = module.apply({**variables, 'quant_stats': stats}, *args, mutable=['quant_stats'])
    stats = updates['quant_stats']
    seen += len(batch[0])
  if not seen:
    raise ValueError('static activation quantization needs calibration examples; got none')
  return stats, seen


def quantize(
  spec,
  variables: Any,
  *,
  method: str = 'auto',
  activations: str = 'static',
  calibration: Iterable[Sequence[np.ndarray]] = (),
) -> tuple[Any, Any]:
  """(quantized spec, variables to save) for a float model.

  Args:
    spec: the float model's `ModelSpec`.
    variables: its variables ({'params', ...} numpy arrays).
    method: 'qwix_ptq', 'weight_only' or 'auto' (qwix_ptq if qwix can wrap
      the model, else weight_only, e.g. for the scanned RNNs).
    activations: 'static' (scales calibrated on `calibration`), 'dynamic'
      or 'none'; ignored by 'weight_only'.
    calibration: batches of raw model inputs, as served: (x,) or (x, mask).
  """
  import qwix

  if spec.quantization:
    raise ValueError(f'model is already quantized: {dict(spec.quantization)}')
  if activations not in ACTIVATIONS:
    raise ValueError(f'activations must be one of {ACTIVATIONS}, got {activations!r}')
  library = f'qwix {qwix.__version__}'
  if method == 'auto':
    method = 'qwix_ptq' if _qwix_covers(spec, activations) else 'weight_only'
  if method == 'weight_only':
    qspec = dataclasses.replace(
      spec, quantization={'method': 'weight_only', 'weight_dtype': 'int8', 'activations': 'none', 'library': library}
    )
    float_tree = serialization.to_state_dict(variables)

    def store(path, x):
      if path[0] == 'params' and np.ndim(x) >= 2:
        q = qwix.quantize(jnp.asarray(x, jnp.float32), jnp.int8, channelwise_axes=(np.ndim(x) - 1,))
        return {'qvalue': np.asarray(q.qvalue), 'scale': np.asarray(q.scale, np.float32)}
      return np.asarray(x)

    flat = flax.traverse_util.flatten_dict(float_tree)
    return qspec, flax.traverse_util.unflatten_dict({p: store(p, x) for p, x in flat.items()})
  if method != 'qwix_ptq':
    raise ValueError(f"method must be 'auto' or one of {METHODS}, got {method!r}")
  quantization = {'method': method, 'weight_dtype': 'int8', 'activations': activations, 'library': library}
  stats = {}
  if activations == 'static':
    stats, seen = _calibration_stats(dataclasses.replace(spec, quantization=quantization), variables, calibration)
    quantization['calibration_examples'] = seen
  qspec = dataclasses.replace(spec, quantization=quantization)
  abstract = _abstract_qwix(qspec)
  params = jax.tree_util.tree_map(jnp.asarray, variables['params'])
  qparams = qwix.quantize_params(params, abstract['params'], stats)
  quantized = {**variables, 'params': qparams}
  return qspec, jax.tree_util.tree_map(np.asarray, serialization.to_state_dict(quantized))
