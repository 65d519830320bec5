"""beam_dl: Apache Beam transforms, handlers and training for JAX/Flax models.

This package is the library the PTransforms are built from (models, the
RunInference handler, formats, decoders, training). The public PTransforms
live in the top-level `transforms` package, which imports from here and never
the other way round: `from transforms import ClassifyImages`.
"""
__version__ = '0.1.0'

# Every process that runs beam_dl code (launcher, SDK workers unpickling its
# DoFns) gets the fix for Beam's time-based output flush, which loses and
# tears elements with several worker threads (see beam_dl/beam_fixes.py).
from beam_dl import beam_fixes as _beam_fixes  # noqa: E402,F401


def __getattr__(name):
  """`beam_dl.JaxModelHandler`, imported lazily so `import beam_dl.checkpoints`
  stays light."""
  if name == 'JaxModelHandler':
    from beam_dl.handler import JaxModelHandler

    return JaxModelHandler
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
