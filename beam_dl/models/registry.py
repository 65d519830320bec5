"""Name -> Flax module factory registry.

Checkpoints store a model by registry name plus constructor kwargs (see
`beam_dl.models.checkpoints.ModelSpec`), so a worker can rebuild the module without
unpickling code: the registry is the only place a name becomes a class.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
  """Class/function decorator that makes `name` buildable by `build`."""

  def wrap(factory):
    if name in _FACTORIES and _FACTORIES[name] is not factory:
      raise ValueError(f'model name {name!r} is already registered')
    _FACTORIES[name] = factory
    return factory

  return wrap


def build(name: str, **kwargs: Any) -> nn.Module:
  """Returns the module registered as `name`, constructed with `kwargs`."""
  try:
    factory = _FACTORIES[name]
  except KeyError:
    raise ValueError(f'unknown model {name!r}; registered models: {sorted(_FACTORIES)}') from None
  return factory(**kwargs)


def names() -> list[str]:
  return sorted(_FACTORIES)
