"""beam_dl: Apache Beam transforms, handlers and training for JAX/Flax models.

The public PTransforms live in the top-level `transforms` package and are
re-exported here, so `from beam_dl import ClassifyImages` and
`from transforms import ClassifyImages` give the same object.
"""
__version__ = '0.1.0'

# Every process that runs beam_dl code (launcher, SDK workers unpickling its
# DoFns) gets the fix for Beam's time-based output flush, which loses and
# tears elements with several worker threads (see beam_dl/beam_fixes.py).
from beam_dl import beam_fixes as _beam_fixes  # noqa: E402,F401


def __getattr__(name):
  """Lazy re-export, so `import beam_dl.checkpoints` stays light.

  Only CamelCase names (classes) are looked up: lowercase names are
  submodules, which the import system must load itself.
  """
  if name == 'JaxModelHandler':
    from beam_dl.handler import JaxModelHandler

    return JaxModelHandler
  if name[:1].isupper():
    import transforms

    if name in transforms.__all__:
      return getattr(transforms, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
