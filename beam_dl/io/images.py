"""Image bytes -> uint8 HWC arrays with Pillow, with guards for dirty data.

Pure functions, unit-testable without Beam; `transforms.images.DecodeImages`
wraps them in a DoFn with a dead-letter output.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageDecodeError(ValueError):
  """Bytes that are not a decodable image within the spec's limits.

  `kind` is a short, bounded failure class (empty, too_large, too_many_pixels,
  unrecognised, corrupt) used for per-reason counters.
  """

  def __init__(self, message: str, kind: str = 'corrupt'):
    super().__init__(message)
    self.kind = kind


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """What `decode_image` produces.

  Attributes:
    height, width: output size; None keeps the decoded size.
    channels: 1 (grayscale) or 3 (RGB).
    background: grey level alpha is composited onto (0 black, 255 white).
    max_bytes: inputs larger than this are refused before decoding.
    max_pixels: images with more pixels are refused (decompression bombs),
      checked from the header before any pixel is decoded.
  """

  height: int | None = None
  width: int | None = None
  channels: int = 3
  background: int = 0
  max_bytes: int = 64 << 20
  max_pixels: int = 64_000_000

  def __post_init__(self):
    if self.channels not in (1, 3):
      raise ValueError(f'channels must be 1 or 3, got {self.channels}')
    if (self.height is None) != (self.width is None):
      raise ValueError('set both height and width, or neither')

  @property
  def mode(self) -> str:
    return 'L' if self.channels == 1 else 'RGB'

  @property
  def size(self) -> tuple[int, int] | None:
    return None if self.height is None else (self.width, self.height)


def decode_image(data: bytes, spec: ImageSpec = ImageSpec()) -> np.ndarray:
  """Decodes one encoded image to a uint8 array of shape [H, W, channels].

  Raises:
    ImageDecodeError: empty, oversized, unrecognised, truncated or corrupt
      input, with a message naming the cause.
  """
  if not data:
    raise ImageDecodeError('empty input (0 bytes)', 'empty')
  if len(data) > spec.max_bytes:
    raise ImageDecodeError(f'input is {len(data)} bytes, over max_bytes={spec.max_bytes}', 'too_large')
  try:
    with Image.open(io.BytesIO(data)) as img:
      pixels = img.width * img.height
      if pixels > spec.max_pixels:
        raise ImageDecodeError(
            f'{img.width}x{img.height} = {pixels} pixels, over max_pixels={spec.max_pixels}',
            'too_many_pixels',
        )
      if spec.size is not None and img.format == 'JPEG':
        img.draft(spec.mode, spec.size)  # DCT-domain downscale: decode less
      img = ImageOps.exif_transpose(img)
      img = _to_mode(img, spec)
      if spec.size is not None and img.size != spec.size:
        img = img.resize(spec.size, Image.Resampling.BILINEAR)
      array = np.asarray(img, dtype=np.uint8)
  except UnidentifiedImageError:
    raise ImageDecodeError('not a recognised image format', 'unrecognised') from None
  except Image.DecompressionBombError as e:
    raise ImageDecodeError(f'decompression bomb: {e}', 'too_many_pixels') from None
  except (OSError, SyntaxError, ValueError) as e:
    if isinstance(e, ImageDecodeError):
      raise
    raise ImageDecodeError(f'corrupt or truncated image: {e}') from None
  return array[..., None] if spec.channels == 1 else array


def _to_mode(img: Image.Image, spec: ImageSpec) -> Image.Image:
  """Converts any Pillow mode to L or RGB, compositing alpha onto background."""
  has_alpha = img.mode in ('RGBA', 'LA', 'PA') or (
      img.mode == 'P' and 'transparency' in img.info
  )
  if has_alpha:
    rgba = img.convert('RGBA')
    canvas = Image.new('RGBA', rgba.size, (spec.background,) * 3 + (255,))
    img = Image.alpha_composite(canvas, rgba)
  elif img.mode.startswith('I;16') or img.mode == 'I':
    img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8))
  return img.convert(spec.mode)
