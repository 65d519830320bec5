"""Real encoded image bytes for tests, made with Pillow from real digits."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def digits_uint8():
  """scikit-learn's digits as uint8 [N, 8, 8] images (0..255) and labels."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target


def encode(image: np.ndarray | Image.Image, fmt: str, mode: str | None = None, **kwargs) -> bytes:
  """`image` (an array, or a Pillow image as is) encoded as `fmt` by Pillow."""
  if not isinstance(image, Image.Image):
    image = Image.fromarray(image, mode=mode)
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def truncated_jpeg() -> bytes:
  data = encode(np.full((64, 64, 3), 90, np.uint8), 'JPEG')
  return data[: len(data) // 2]


TEXT_NAMED_JPG = b'this is a text file, not a JPEG\n'
