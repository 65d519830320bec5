"""Short-time Fourier transform spectrograms of fixed-rate signals.

Vibration, audio or load curves sampled at a fixed rate become a 2-D
[frequencies, frames] array, so an image model (a CNN) can classify a
stretch of time series. The transform itself is `scipy.signal.stft`;
this module only places the samples of one key and window on the sample
grid and takes the (log) magnitude.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np
from scipy import signal as sp_signal


@dataclasses.dataclass(frozen=True)
class SpectrogramSpec:
  """STFT settings.

  Attributes:
    sample_rate: samples per second of the signal (Hz).
    nperseg: samples per STFT segment (frequency resolution sample_rate/nperseg).
    noverlap: samples shared by consecutive segments (default nperseg // 2).
    window: scipy window name.
    log: return log1p(magnitude) (compresses the dynamic range for CNNs).
  """

  sample_rate: float
  nperseg: int = 64
  noverlap: int | None = None
  window: str = 'hann'
  log: bool = True

  def __post_init__(self):
    if self.sample_rate <= 0 or self.nperseg < 2:
      raise ValueError('sample_rate must be > 0 and nperseg >= 2')


def spectrogram(samples: np.ndarray, spec: SpectrogramSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """1-D samples -> (frequencies [K], frame times [T], float32 [K, T] magnitudes)."""
  samples = np.asarray(samples, np.float64)
  if samples.ndim != 1:
    raise ValueError(f'expected a 1-D signal, got shape {samples.shape}')
  nperseg = min(spec.nperseg, len(samples))
  noverlap = spec.noverlap if spec.noverlap is not None else nperseg // 2
  freqs, times, z = sp_signal.stft(
    samples,
    fs=spec.sample_rate,
    window=spec.window,
    nperseg=nperseg,
    noverlap=min(noverlap, nperseg - 1),
    boundary=None,
    padded=False,
  )
  magnitude = np.abs(z)
  if spec.log:
    magnitude = np.log1p(magnitude)
  return freqs, times, magnitude.astype(np.float32)


def place_samples(
  samples: Iterable[tuple[float, float]], start: float, end: float, sample_rate: float, fill: float = 0.0
) -> tuple[np.ndarray, int]:
  """(time, value) samples of one window -> the signal on its sample grid.

  Sample i of the grid is at `start + i / sample_rate`; each sample goes to
  its nearest grid slot (arrival order and small clock jitter do not
  matter). Slots nobody filled keep `fill`. Returns (signal, missing slots).
  """
  size = int(round((end - start) * sample_rate))
  signal = np.full((size,), np.nan)
  for time, value in samples:
    index = int(round((time - start) * sample_rate))
    if 0 <= index < size:
      signal[index] = value
  missing = int(np.isnan(signal).sum())
  signal[np.isnan(signal)] = fill
  return signal, missing
