"""RunInference reads no memory (and warns on every reading) without
PyTorch (Beam 2.77).

`apache_beam.ml.inference.base` imports `resource` in the same `try` as its
torch-only `ModelManager`, so on a machine without torch the ImportError sets
`resource = None`: each memory reading logs "Resource module is not available
for current platform" and reports 0. The fix puts the standard module back.
"""

from __future__ import annotations

from beam_dl.beam_fixes import BeamFix


def _base():
  from apache_beam.ml.inference import base  # pylint: disable=g-import-not-at-top

  return base


_BEAM_RESOURCE = getattr(_base(), 'resource', None)


def apply() -> bool:
  base = _base()
  if getattr(base, 'resource', True) is not None:
    return True
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # not on this platform: Beam's warning is then right
    return False
  base.resource = resource
  return True


def revert() -> None:
  _base().resource = _BEAM_RESOURCE


FIX = BeamFix('inference_resource', "RunInference's memory readings without PyTorch", '>=2.77,<2.78', apply, revert)
