"""beam_dl: Apache Beam transforms, handlers and training for JAX/Flax models.

This package is the library the PTransforms are built from, one folder per
role: `serving` (the RunInference handler), `training`, `compression`,
`models` (Flax modules and the model-directory format), `decoding`,
`features`, `formats`, `io`, `preprocessing` (tf.Transform), `operations`
(registry, drift, metrics), `services` (local Kafka and friends), `cli`,
`core` (what every role shares) and `beam_fixes` (runtime fixes to Beam).
The public PTransforms live in the top-level `transforms` package, which
imports from here and never the other way round:
`from transforms import ClassifyImages`.
"""

__version__ = '0.1.0'

# Every process that runs beam_dl code (launcher, SDK workers unpickling its
# DoFns) gets the fixes to Beam that stop lost elements and failed
# translations (beam_dl/beam_fixes, docs/beam_fixes.md).
import logging as _logging  # noqa: E402

from beam_dl import beam_fixes as _beam_fixes  # noqa: E402

_beam_fixes.apply_all()
if _logging.getLogger().hasHandlers():  # else pipelines log them when their job starts
  _beam_fixes.log_active()


def __getattr__(name):
  """`beam_dl.JaxModelHandler`, imported lazily so `import beam_dl.models.checkpoints`
  stays light."""
  if name == 'JaxModelHandler':
    from beam_dl.serving.handler import JaxModelHandler

    return JaxModelHandler
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
