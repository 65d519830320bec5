"""Windowed feature extraction: the per-window maths behind `transforms.windowing`.

aggregates   count/sum/mean/std/min/max/last/rate as one mergeable CombineFn
lastn        the last N events of a key and window as a padded [N, F] sequence
spectrogram  STFT spectrograms of fixed-rate signals (scipy.signal.stft)
windows      WindowSpec: window kind, lateness, early triggers -> WindowInto
late         LateDataGate: late events to a side output instead of dropped
"""

from beam_dl.features.aggregates import WindowStats, WindowStatsFn, features_record, stats_of_arrays
from beam_dl.features.lastn import LastNFn, Sequence, pad_events
from beam_dl.features.late import LATE, LateDataGate
from beam_dl.features.spectrogram import SpectrogramSpec, place_samples, spectrogram
from beam_dl.features.windows import WindowSpec

__all__ = [
  'LATE',
  'LastNFn',
  'LateDataGate',
  'Sequence',
  'SpectrogramSpec',
  'WindowSpec',
  'WindowStats',
  'WindowStatsFn',
  'features_record',
  'pad_events',
  'place_samples',
  'spectrogram',
  'stats_of_arrays',
]
