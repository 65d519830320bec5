"""Image bytes -> uint8 HWC arrays with Pillow, with guards for dirty data.

Pure functions, unit-testable without Beam; `transforms.images.DecodeImages`
wraps them in a DoFn with a dead-letter output.

Decoding is one pass of Pillow per image:
  open (header only) -> guards (bytes, pixels) -> JPEG `draft` (the decoder's
  DCT-domain downscale, only when the output is smaller) -> load the first
  frame/page -> EXIF orientation -> mode to L/RGB (alpha composited or
  dropped) -> resize/crop per `ImageSpec.fit`.
Normalisation to float (mean/std) is a separate, optional step
(`normalize`): pipelines that feed the JAX handler ship uint8 and let the
handler scale inside jit.
"""
from __future__ import annotations

import dataclasses
import io
import zlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FITS = ('stretch', 'cover', 'contain')
CROPS = ('center', 'random')
ALPHA = ('composite', 'drop')
_RESAMPLE = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'lanczos': Image.Resampling.LANCZOS,
    'box': Image.Resampling.BOX,
}
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


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
    height, width: output size; None keeps the decoded size (or the
      `shorter_side` resize alone).
    channels: 1 (grayscale) or 3 (RGB).
    background: colour alpha is composited onto and `contain` pads with: a
      grey level (0 black, 255 white) or an (R, G, B) tuple.
    max_bytes: inputs larger than this are refused before decoding.
    max_pixels: images with more pixels are refused (decompression bombs),
      checked from the header before any pixel is decoded.
    fit: how (height, width) is reached: 'stretch' resizes to exactly that
      size (aspect not kept); 'cover' keeps the aspect, scales to cover the
      size and crops the excess; 'contain' keeps the aspect, scales to fit
      inside and pads with `background`.
    shorter_side: first resize so the shorter side is this (aspect kept);
      with height/width set the result is then cropped (the classic
      'resize 256, crop 224').
    crop: 'center', or 'random' (seeded per image by `seed` and the key, see
      `decode_image`'s `rng`) for 'cover' and `shorter_side` crops.
    seed: seed of random crops.
    alpha: 'composite' onto `background`, or 'drop' the alpha channel.
    resample: 'bilinear' | 'bicubic' | 'lanczos' | 'box' | 'nearest'.
    reduced_decode: let the JPEG decoder downscale while decoding (Pillow
      `draft`) when the output is at most half the stored size.
  """

  height: int | None = None
  width: int | None = None
  channels: int = 3
  background: int | tuple[int, int, int] = 0
  max_bytes: int = 64 << 20
  max_pixels: int = 64_000_000
  fit: str = 'stretch'
  shorter_side: int | None = None
  crop: str = 'center'
  seed: int = 0
  alpha: str = 'composite'
  resample: str = 'bilinear'
  reduced_decode: bool = True

  def __post_init__(self):
    if self.channels not in (1, 3):
      raise ValueError(f'channels must be 1 or 3, got {self.channels}')
    if (self.height is None) != (self.width is None):
      raise ValueError('set both height and width, or neither')
    for name, value, allowed in (('fit', self.fit, FITS), ('crop', self.crop, CROPS),
                                 ('alpha', self.alpha, ALPHA),
                                 ('resample', self.resample, tuple(_RESAMPLE))):
      if value not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {value!r}')
    if self.shorter_side is not None and self.shorter_side < 1:
      raise ValueError(f'shorter_side must be >= 1, got {self.shorter_side}')
    if self.height is not None and (self.height < 1 or self.width < 1):
      raise ValueError(f'height and width must be >= 1, got {self.height}x{self.width}')
    if isinstance(self.background, (tuple, list)) and len(self.background) != 3:
      raise ValueError(f'background must be a grey level or (R, G, B), got {self.background}')

  @property
  def mode(self) -> str:
    return 'L' if self.channels == 1 else 'RGB'

  @property
  def size(self) -> tuple[int, int] | None:
    return None if self.height is None else (self.width, self.height)

  @property
  def rgb_background(self) -> tuple[int, int, int]:
    bg = self.background
    return tuple(int(c) for c in bg) if isinstance(bg, (tuple, list)) else (int(bg),) * 3


def decode_image(data: bytes, spec: ImageSpec = ImageSpec(),
                 rng: np.random.Generator | None = None) -> np.ndarray:
  """Decodes one encoded image to a uint8 array of shape [H, W, channels].

  The first frame of animations (GIF, WebP) and the first page of
  multi-page TIFFs is decoded. `rng` drives random crops; by default it is
  seeded from `spec.seed` and the bytes, so a given image always gets the same
  crop (see `rng_for_key` to seed per key instead).

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
      if spec.reduced_decode and img.format == 'JPEG':
        _draft(img, spec)
      img.load()
      img = ImageOps.exif_transpose(img)
      img = _to_mode(img, spec)
      if rng is None and spec.crop == 'random':
        rng = rng_for_bytes(data, spec.seed)
      img = _resize(img, spec, rng)
      array = np.asarray(img, dtype=np.uint8)
  except UnidentifiedImageError:
    raise ImageDecodeError('not a recognised image format', 'unrecognised') from None
  except Image.DecompressionBombError as e:
    raise ImageDecodeError(f'decompression bomb: {e}', 'too_many_pixels') from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    if isinstance(e, ImageDecodeError):
      raise
    raise ImageDecodeError(f'corrupt or truncated image: {e}') from None
  return array[..., None] if spec.channels == 1 else array


def rng_for_bytes(data: bytes, seed: int) -> np.random.Generator:
  """A generator for one image's random crop: reproducible per (seed, bytes)."""
  return np.random.default_rng([seed, zlib.crc32(data)])


def rng_for_key(key: str, seed: int) -> np.random.Generator:
  """A generator for one image's random crop: reproducible per (seed, key)."""
  return rng_for_bytes(str(key).encode('utf-8'), seed)


def _needed_size(spec: ImageSpec, width: int, height: int) -> tuple[int, int] | None:
  """Smallest (w, h) the decoded image must keep for `spec`'s output, or None."""
  if spec.shorter_side is not None:
    s = spec.shorter_side
    if spec.size is not None:
      s = max(s, spec.width, spec.height)
    return (s, s)
  if spec.size is None:
    return None
  if spec.fit == 'stretch':
    return spec.size
  tw, th = spec.size
  scale = (max if spec.fit == 'cover' else min)(tw / width, th / height)
  return (max(1, int(width * scale)), max(1, int(height * scale)))


def _draft(img: Image.Image, spec: ImageSpec) -> None:
  """Ask the JPEG decoder for a 1/2, 1/4 or 1/8 scale that still covers the output."""
  width, height = img.size
  orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
  if orientation in _SWAPS_AXES:  # exif_transpose will swap the axes later
    width, height = height, width
  needed = _needed_size(spec, width, height)
  if needed is None:
    return
  if orientation in _SWAPS_AXES:
    needed = (needed[1], needed[0])
  mode = spec.mode if img.mode in ('RGB', 'L', 'YCbCr') else None
  img.draft(mode, needed)


def _to_mode(img: Image.Image, spec: ImageSpec) -> Image.Image:
  """Converts any Pillow mode to L or RGB, compositing or dropping alpha."""
  has_alpha = img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (
      img.mode == 'P' and 'transparency' in img.info
  )
  if has_alpha and spec.alpha == 'composite':
    rgba = img.convert('RGBA')
    canvas = Image.new('RGBA', rgba.size, spec.rgb_background + (255,))
    img = Image.alpha_composite(canvas, rgba)
  elif has_alpha and img.mode in ('P', 'PA'):
    img = img.convert('RGBA')  # palette alpha: resolve colours, then drop alpha below
  elif img.mode.startswith('I;16') or img.mode == 'I':
    img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8))
  return img.convert(spec.mode)


def _crop_box(size: tuple[int, int], target: tuple[int, int], crop: str,
              rng: np.random.Generator | None) -> tuple[int, int, int, int]:
  (w, h), (tw, th) = size, target
  if crop == 'random':
    x = int(rng.integers(0, w - tw + 1))
    y = int(rng.integers(0, h - th + 1))
  else:
    x, y = (w - tw) // 2, (h - th) // 2
  return (x, y, x + tw, y + th)


def _scaled(img: Image.Image, scale: float, resample) -> Image.Image:
  size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
  return img if size == img.size else img.resize(size, resample)


def _resize(img: Image.Image, spec: ImageSpec, rng: np.random.Generator | None) -> Image.Image:
  resample = _RESAMPLE[spec.resample]
  if spec.shorter_side is not None:
    img = _scaled(img, spec.shorter_side / min(img.size), resample)
    if spec.size is None:
      return img
    if img.width < spec.width or img.height < spec.height:  # crop larger than side
      img = _scaled(img, max(spec.width / img.width, spec.height / img.height), resample)
    return img.crop(_crop_box(img.size, spec.size, spec.crop, rng))
  if spec.size is None or img.size == spec.size:
    return img
  if spec.fit == 'stretch':
    return img.resize(spec.size, resample)
  if spec.fit == 'cover':
    img = _scaled(img, max(spec.width / img.width, spec.height / img.height), resample)
    img = _scaled(img, max(spec.width / img.width, spec.height / img.height, 1.0), resample)
    return img.crop(_crop_box(img.size, spec.size, spec.crop, rng))
  # contain: fit inside, pad with the background, centred.
  img = _scaled(img, min(spec.width / img.width, spec.height / img.height), resample)
  fill = spec.rgb_background if img.mode == 'RGB' else spec.rgb_background[0]
  canvas = Image.new(img.mode, spec.size, fill)
  canvas.paste(img, ((spec.width - img.width) // 2, (spec.height - img.height) // 2))
  return canvas


def normalize(image: np.ndarray, mean: Sequence[float] | float = 0.0,
              std: Sequence[float] | float = 1.0, scale: float = 1 / 255) -> np.ndarray:
  """float32 (image * scale - mean) / std, per channel (e.g. ImageNet mean/std)."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  if np.any(std == 0):
    raise ValueError('std must be non-zero')
  return (image.astype(np.float32) * np.float32(scale) - mean) / std
