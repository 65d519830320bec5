"""beam_fixes 4: RunInference reads process memory without a warning on machines without PyTorch.

(Fixes 1-3 are tested in test_threads.py, test_state_cache_sizing.py and
test_windowing.py.)
"""
import logging

from apache_beam.ml.inference import base

import beam_dl  # noqa: F401  (applies the fixes)
from beam_dl import beam_fixes


def test_inference_memory_reading_works_without_torch(caplog):
  assert beam_fixes.resource_module_fixed
  with caplog.at_level(logging.WARNING):
    used = base._get_current_process_memory_in_bytes()  # pylint: disable=protected-access
  assert used > 10 * 2**20  # this process, with Beam and JAX loaded
  assert not [r for r in caplog.records if 'Resource module is not available' in r.getMessage()]
