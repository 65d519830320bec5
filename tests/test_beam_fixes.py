"""beam_dl.beam_fixes: each fix shows its bug on unpatched Beam (so an upgrade
that fixes it upstream fails here and the fix can go), refuses Beam versions
it was not written for, can be turned off, and is logged once.

The data-plane flush is shown in test_threads.py, the state-cache sizing in
test_state_cache_sizing.py; the other bugs, and the machinery, here.
"""

import json
import logging
import os
import subprocess
import sys
import time

import apache_beam as beam
import pytest
from apache_beam.ml.inference import base
from apache_beam.runners import pipeline_context
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import trigger, window
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.utils.timestamp import Timestamp

import beam_dl  # noqa: F401  (applies the fixes)
from beam_dl import beam_fixes
from beam_dl.beam_fixes import (
  batch_trigger_clock,
  bundle_end_wait,
  inference_resource,
  processing_time_delay,
  side_input_commit,
  state_commit,
)

ALL = [
  'output_flush',
  'state_cache_sizing',
  'state_commit',
  'bundle_end_wait',
  'processing_time_delay',
  'inference_resource',
  'side_input_commit',
  'batch_trigger_clock',
]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}, check=True
  )


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


@pytest.mark.skipif(
  'torch' in sys.modules or __import__('importlib').util.find_spec('torch') is not None,
  reason='with PyTorch installed Beam imports resource itself',
)
def test_beams_inference_base_has_no_resource_module_without_torch():
  out = run_python(
    'import beam_dl; from apache_beam.ml.inference import base; print(base.resource)', BEAM_DL_BEAM_FIXES='off'
  )
  assert out.stdout.strip() == 'None'
  assert inference_resource.apply() and base.resource is not None


def test_inference_memory_reading_works_without_torch(caplog):
  with caplog.at_level(logging.WARNING):
    used = base._get_current_process_memory_in_bytes()  # pylint: disable=protected-access
  assert used > 10 * 2**20  # this process, with Beam and JAX loaded
  assert not [r for r in caplog.records if 'Resource module is not available' in r.getMessage()]


CHECK = """
import json, beam_dl
from beam_dl import beam_fixes
from apache_beam.runners.worker import data_plane, statecache
from apache_beam.transforms import trigger
print(json.dumps({"active": beam_fixes.active(),
  "flush": bool(data_plane.TimeBasedBufferingClosableOutputStream.__dict__.get("_beam_dl_fixed")),
  "sizing": statecache.get_deep_size.__module__,
  "trigger": bool(trigger.AfterProcessingTime.__dict__.get("_beam_dl_fixed"))}))
"""


def test_off_leaves_beam_as_it_is():
  got = json.loads(run_python(CHECK, BEAM_DL_BEAM_FIXES='off').stdout)
  assert got == {'active': [], 'flush': False, 'sizing': 'apache_beam.runners.worker.statecache', 'trigger': False}


def test_named_fixes_can_be_turned_off():
  got = json.loads(run_python(CHECK, BEAM_DL_BEAM_FIXES='-output_flush,-processing_time_delay').stdout)
  assert got['active'] == [
    'state_cache_sizing',
    'state_commit',
    'bundle_end_wait',
    'inference_resource',
    'side_input_commit',
    'batch_trigger_clock',
  ]
  assert not got['flush'] and not got['trigger'] and got['sizing'] == 'beam_dl.beam_fixes.state_cache_sizing'


def test_refuses_a_beam_version_it_was_not_written_for():
  code = """
import logging; logging.basicConfig(level=logging.INFO)
import beam_dl
from beam_dl import beam_fixes
from apache_beam.runners.worker import data_plane
print(beam_fixes.apply_all(beam_version="2.80.0", environ={}))
beam_fixes.log_active(force=True)
print(bool(data_plane.TimeBasedBufferingClosableOutputStream.__dict__.get("_beam_dl_fixed")))
"""
  out = run_python(code, BEAM_DL_BEAM_FIXES='off')
  assert out.stdout.split() == ['[]', 'False']
  refused = [line for line in out.stderr.splitlines() if 'this is 2.80.0' in line]
  assert len(refused) == len(ALL) and 'output_flush (written for Beam >=2.77,<2.78' in refused[0]


def test_the_fixes_in_place_are_logged_once():
  code = """
import logging; logging.basicConfig(level=logging.INFO)
import beam_dl, beam_dl.serving.handler
from beam_dl import beam_fixes, cli
cli.configure_logging(); beam_fixes.log_active()
"""
  lines = [line for line in run_python(code).stderr.splitlines() if 'fixes in place' in line]
  assert len(lines) == 1 and ', '.join(ALL) in lines[0] and 'BEAM_DL_BEAM_FIXES=off' in lines[0]


class _EmitOnce(beam.DoFn):
  """Passes the first element per key on, as `WatchModelAlias` passes the
  first version of an alias on."""

  SEEN = ReadModifyWriteStateSpec('seen', beam.coders.PickleCoder())

  def process(self, element, seen=beam.DoFn.StateParam(SEEN)):
    if seen.read() is None:
      seen.write(True)
      yield 'model-v2'


def side_input_seen_by_a_consumer() -> list:
  """The list side input a main input sees, fed by a stage that runs in
  several bundles (a PeriodicImpulse whose ticks lie ahead defers) and emits
  once, in its first bundle."""
  start = Timestamp.now() + 2
  with TestPipeline('FnApiRunner') as p:
    once = (
      p
      | PeriodicImpulse(start_timestamp=start, stop_timestamp=start + 1, fire_interval=0.25)
      | beam.Map(lambda tick: ('alias', float(tick)))
      | beam.ParDo(_EmitOnce())
      | beam.WindowInto(
        window.GlobalWindows(),
        trigger=trigger.Repeatedly(trigger.AfterProcessingTime(1)),
        accumulation_mode=trigger.AccumulationMode.DISCARDING,
      )
    )
    seen = p | beam.Create([None]) | beam.Map(lambda _, side: sorted(side), side=beam.pvalue.AsList(once))
    assert_that(seen, equal_to([['model-v2']]))


def test_fn_api_runners_side_input_repeats_elements_per_producer_bundle():
  side_input_commit.revert()
  try:
    with pytest.raises(Exception, match=r"model-v2', 'model-v2'"):  # one copy per later bundle
      side_input_seen_by_a_consumer()
  finally:
    assert side_input_commit.apply()
  side_input_seen_by_a_consumer()  # fixed: the element once


def sum_per_window_with_early_firings() -> None:
  """A batch GroupByKey whose windowing fires early on processing time."""
  with TestPipeline('FnApiRunner') as p:
    sums = (
      p
      | beam.Create(list(range(10)))
      | beam.Map(lambda n: window.TimestampedValue(('k', n), n))
      | beam.WindowInto(
        window.FixedWindows(5),
        trigger=trigger.AfterWatermark(early=trigger.AfterProcessingTime(10)),
        accumulation_mode=trigger.AccumulationMode.DISCARDING,
      )
      | beam.CombinePerKey(sum)
      | beam.MapTuple(lambda key, total: total)
    )
    assert_that(sums, equal_to([0 + 1 + 2 + 3 + 4, 5 + 6 + 7 + 8 + 9]))  # once per window, nothing early


def test_beams_batch_group_by_key_has_no_clock_for_processing_time_triggers():
  batch_trigger_clock.revert()
  try:
    with pytest.raises(Exception, match="'NoneType' object has no attribute 'time'"):
      sum_per_window_with_early_firings()
  finally:
    assert batch_trigger_clock.apply()
  sum_per_window_with_early_firings()


def _bundle_end_wait_s(bundle_s: float) -> float:
  """How long ending a bundle of `bundle_s` waits for its state sampler, made as BundleProcessor makes it."""
  from apache_beam.runners.worker import statesampler
  from apache_beam.utils.counters import CounterFactory

  sampler = statesampler.StateSampler('fnapi-step-test', CounterFactory())
  sampler.start()
  time.sleep(bundle_s)
  start = time.perf_counter()
  sampler.stop()
  return time.perf_counter() - start


def test_beams_bundle_end_waits_out_the_state_samplers_sleep():
  """Beam's sampler sleeps up to 200 ms between samples and a bundle's end joins it: after a 1 s bundle the
  join waits tens of ms (the sleep grows 1.2x from 2 ms). With the fix the period, so the wait, is 10 ms at most."""
  bundle_end_wait.revert()
  try:
    from apache_beam.runners.worker import statesampler

    assert statesampler.StateSampler('s', None).sampling_period_ms == 200
    assert max(_bundle_end_wait_s(1.0) for _ in range(5)) > 0.02
  finally:
    assert bundle_end_wait.apply()
  assert statesampler.StateSampler('s', None).sampling_period_ms == bundle_end_wait.SAMPLING_PERIOD_MS == 10


class _RecordingStateHandler:
  """A state handler that records the order of state writes sent and waited for (no runner behind it)."""

  def __init__(self):
    self.events: list[str] = []

  def _future(self, kind: str, key) -> '_Recorded':
    name = f'{kind} {key.bag_user_state.key!r}'
    self.events.append(f'send {name}')
    return _Recorded(self.events, name)

  def clear(self, state_key):
    return self._future('clear', state_key)

  def extend(self, state_key, coder, elements):
    return self._future('append', state_key)


class _Recorded:
  def __init__(self, events, name):
    self._events, self._name = events, name

  def get(self, timeout=None):
    self._events.append(f'wait {self._name}')


def _commit_three_keys() -> list[str]:
  """Commits a ReadModifyWrite cell written for each of three keys, as a bundle's end does."""
  from apache_beam import coders
  from apache_beam.coders.coders import GlobalWindowCoder
  from apache_beam.runners.worker import bundle_processor

  handler = _RecordingStateHandler()
  context = bundle_processor.FnApiUserStateContext(handler, 'gate', coders.StrUtf8Coder(), GlobalWindowCoder())
  spec = ReadModifyWriteStateSpec('cell', coders.PickleCoder())
  for key in ('a', 'b', 'c'):
    context.get_state(spec, key, window.GlobalWindow()).write({'key': key})
  context.commit()
  return handler.events


def test_beams_state_commit_waits_for_each_cells_write_in_turn():
  """Beam waits for each cell's write before sending the next key's (a round trip per key at every bundle
  end); with the fix every write is sent, clear before append as Beam sends them, then all are waited for."""
  state_commit.revert()
  try:
    beams = _commit_three_keys()
  finally:
    assert state_commit.apply()
  assert [e.split()[0] for e in beams] == ['send', 'send', 'wait'] * 3
  fixed = _commit_three_keys()
  assert [e.split()[0] for e in fixed] == ['send'] * 6 + ['wait'] * 6
  assert [e for e in fixed if e.startswith('send')] == [e for e in beams if e.startswith('send')]
