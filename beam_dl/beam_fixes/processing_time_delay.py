"""A sub-second `AfterProcessingTime` delay does not survive the Runner API
(Beam 2.77).

`trigger.AfterProcessingTime(0.5).to_runner_api` writes `delay * 1000` (a
float) into the int64 `delay_millis` field and raises, so the pipeline fails
to translate its WindowInto; and `from_runner_api` floors the milliseconds
to whole seconds (`// 1000`), so the Python runners would fire a 0.5 s
trigger at once. The fix writes rounded milliseconds and reads them back as
float seconds (whole seconds still come back as ints, as Beam returns them).
"""

from __future__ import annotations

from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.transforms import trigger

from beam_dl.beam_fixes import BeamFix

CLS = trigger.AfterProcessingTime
BEAM_TO_RUNNER_API = CLS.__dict__['to_runner_api']
BEAM_FROM_RUNNER_API = CLS.__dict__['from_runner_api']


def _to_runner_api(self, context):
  del context
  delay = beam_runner_api_pb2.TimestampTransform(
    delay=beam_runner_api_pb2.TimestampTransform.Delay(delay_millis=int(round(self.delay * 1000)))
  )
  return beam_runner_api_pb2.Trigger(
    after_processing_time=beam_runner_api_pb2.Trigger.AfterProcessingTime(timestamp_transforms=[delay])
  )


def _from_runner_api(proto, context):
  del context
  transforms = proto.after_processing_time.timestamp_transforms
  millis = transforms[0].delay.delay_millis if transforms else 0
  return trigger.AfterProcessingTime(delay=millis / 1000 if millis % 1000 else millis // 1000)


def apply() -> bool:
  if CLS.__dict__.get('_beam_dl_fixed'):
    return True
  CLS.to_runner_api = _to_runner_api
  CLS.from_runner_api = staticmethod(_from_runner_api)
  CLS._beam_dl_fixed = True
  return True


def revert() -> None:
  CLS.to_runner_api = BEAM_TO_RUNNER_API
  CLS.from_runner_api = BEAM_FROM_RUNNER_API
  CLS._beam_dl_fixed = False


FIX = BeamFix(
  'processing_time_delay', 'sub-second AfterProcessingTime fails to translate', '>=2.77,<2.78', apply, revert
)
