"""beam_dl.beam_fixes: each fix shows its bug on unpatched Beam (so an upgrade
that fixes it upstream fails here and the fix can go), refuses Beam versions
it was not written for, can be turned off, and is logged once.

The data-plane flush is shown in test_threads.py, the state-cache sizing in
test_state_cache_sizing.py; the other two bugs, and the machinery, here.
"""
import json
import logging
import os
import subprocess
import sys

import pytest
from apache_beam.ml.inference import base
from apache_beam.runners import pipeline_context
from apache_beam.transforms import trigger

import beam_dl  # noqa: F401  (applies the fixes)
from beam_dl import beam_fixes
from beam_dl.beam_fixes import inference_resource, processing_time_delay

ALL = ['output_flush', 'state_cache_sizing', 'processing_time_delay', 'inference_resource']


def run_python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                        env={**os.environ, **env}, check=True)


def test_every_fix_is_in_place_on_the_targeted_beam():
  assert beam_fixes.active() == ALL


def test_beams_sub_second_processing_time_delay_fails_to_translate():
  context = pipeline_context.PipelineContext()
  processing_time_delay.revert()
  try:
    with pytest.raises(TypeError):  # Beam writes a float into the int64 delay_millis
      trigger.AfterProcessingTime(0.5).to_runner_api(context)
  finally:
    assert processing_time_delay.apply()
  proto = trigger.AfterProcessingTime(0.5).to_runner_api(context)
  assert trigger.AfterProcessingTime.from_runner_api(proto, context).delay == 0.5
  processing_time_delay.revert()
  try:
    assert trigger.AfterProcessingTime.from_runner_api(proto, context).delay == 0  # floored: fires at once
  finally:
    processing_time_delay.apply()


@pytest.mark.skipif('torch' in sys.modules or __import__('importlib').util.find_spec('torch') is not None,
                    reason='with PyTorch installed Beam imports resource itself')
def test_beams_inference_base_has_no_resource_module_without_torch():
  out = run_python('import beam_dl; from apache_beam.ml.inference import base; print(base.resource)',
                   BEAM_DL_BEAM_FIXES='off')
  assert out.stdout.strip() == 'None'
  assert inference_resource.apply() and base.resource is not None


def test_inference_memory_reading_works_without_torch(caplog):
  with caplog.at_level(logging.WARNING):
    used = base._get_current_process_memory_in_bytes()  # pylint: disable=protected-access
  assert used > 10 * 2**20  # this process, with Beam and JAX loaded
  assert not [r for r in caplog.records if 'Resource module is not available' in r.getMessage()]


CHECK = '''
import json, beam_dl
from beam_dl import beam_fixes
from apache_beam.runners.worker import data_plane, statecache
from apache_beam.transforms import trigger
print(json.dumps({"active": beam_fixes.active(),
  "flush": bool(data_plane.TimeBasedBufferingClosableOutputStream.__dict__.get("_beam_dl_fixed")),
  "sizing": statecache.get_deep_size.__module__,
  "trigger": bool(trigger.AfterProcessingTime.__dict__.get("_beam_dl_fixed"))}))
'''


def test_off_leaves_beam_as_it_is():
  got = json.loads(run_python(CHECK, BEAM_DL_BEAM_FIXES='off').stdout)
  assert got == {'active': [], 'flush': False, 'sizing': 'apache_beam.runners.worker.statecache', 'trigger': False}


def test_named_fixes_can_be_turned_off():
  got = json.loads(run_python(CHECK, BEAM_DL_BEAM_FIXES='-output_flush,-processing_time_delay').stdout)
  assert got['active'] == ['state_cache_sizing', 'inference_resource']
  assert not got['flush'] and not got['trigger'] and got['sizing'] == 'beam_dl.beam_fixes.state_cache_sizing'


def test_refuses_a_beam_version_it_was_not_written_for():
  code = '''
import logging; logging.basicConfig(level=logging.INFO)
import beam_dl
from beam_dl import beam_fixes
from apache_beam.runners.worker import data_plane
print(beam_fixes.apply_all(beam_version="2.80.0", environ={}))
beam_fixes.log_active(force=True)
print(bool(data_plane.TimeBasedBufferingClosableOutputStream.__dict__.get("_beam_dl_fixed")))
'''
  out = run_python(code, BEAM_DL_BEAM_FIXES='off')
  assert out.stdout.split() == ['[]', 'False']
  refused = [line for line in out.stderr.splitlines() if 'this is 2.80.0' in line]
  assert len(refused) == len(ALL) and 'output_flush (written for Beam >=2.77,<2.78' in refused[0]


def test_the_fixes_in_place_are_logged_once():
  code = '''
import logging; logging.basicConfig(level=logging.INFO)
import beam_dl, beam_dl.serving.handler
from beam_dl import beam_fixes, cli
cli.configure_logging(); beam_fixes.log_active()
'''
  lines = [line for line in run_python(code).stderr.splitlines() if 'fixes in place' in line]
  assert len(lines) == 1 and ', '.join(ALL) in lines[0] and 'BEAM_DL_BEAM_FIXES=off' in lines[0]
