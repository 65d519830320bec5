"""Image bytes -> uint8 HWC arrays with Pillow, with guards for dirty data.

Pure functions, unit-testable without Beam; `transforms.images.DecodeImages`
wraps them in a DoFn with a dead-letter output.

Decoding is one pass of Pillow per image:
  open (header only) -> guards (bytes, pixels) -> JPEG `draft` (the decoder's
  DCT-domain downscale, only when the output is smaller) -> load the first
  frame/page -> EXIF orientation -> mode to L/RGB (alpha composited or
  dropped) -> resize/crop per `ImageSpec.fit`.
TIFFs as scientific, industrial and medical imaging write them (16/32-bit
integers, float32/64, planar samples, several pages) are decoded with
tifffile instead when Pillow cannot take them as 8-bit (see `_decode_tiff`),
then scaled to uint8 (`to_uint8`).
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
DEPTH_SCALINGS = ('range', 'minmax')
_TIFF_MAGIC = (b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+')  # classic and BigTIFF
_HIGH_DEPTH_MODES = ('I', 'F', 'I;16', 'I;16B', 'I;16L', 'I;16N')
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
  unrecognised, unsupported, corrupt) used for per-reason counters.
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
    depth_scaling: how images deeper than 8 bits become uint8 (`to_uint8`):
      'range' maps the dtype's full range (uint16 0..65535 -> 0..255), the
      same for every image, so intensities stay comparable across a data set
      and match what the sensor recorded; 'minmax' stretches each image's
      own min..max to 0..255, for data that uses a small part of its dtype
      (12-bit sensors in uint16) at the cost of per-image contrast.
      Floats are taken as 0..1 when all their values lie there, else
      min..max either way (a float has no range of its own).
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
  depth_scaling: str = 'range'

  def __post_init__(self):
    if self.channels not in (1, 3):
      raise ValueError(f'channels must be 1 or 3, got {self.channels}')
    if (self.height is None) != (self.width is None):
      raise ValueError('set both height and width, or neither')
    for name, value, allowed in (
      ('fit', self.fit, FITS),
      ('crop', self.crop, CROPS),
      ('alpha', self.alpha, ALPHA),
      ('depth_scaling', self.depth_scaling, DEPTH_SCALINGS),
      ('resample', self.resample, tuple(_RESAMPLE)),
    ):
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


def decode_image(data: bytes, spec: ImageSpec = ImageSpec(), rng: np.random.Generator | None = None) -> np.ndarray:
  """Decodes one encoded image to a uint8 array of shape [H, W, channels].

  The first frame of animations (GIF, WebP) and the first page of
  multi-page TIFFs is decoded. `rng` drives random crops; by default it is
  seeded from `spec.seed` and the bytes, so a given image always gets the same
  crop (see `rng_for_key` to seed per key instead).

  TIFFs whose samples are deeper than 8 bits, signed or float decode through
  tifffile and `to_uint8` (see `ImageSpec.depth_scaling`).

  Raises:
    ImageDecodeError: empty, oversized, unrecognised, unsupported (recognised,
      but an encoding this build can't decode, e.g. a TIFF compression that
      needs imagecodecs), truncated or corrupt input, with a message naming
      the cause.
  """
  if not data:
    raise ImageDecodeError('empty input (0 bytes)', 'empty')
  if len(data) > spec.max_bytes:
    raise ImageDecodeError(f'input is {len(data)} bytes, over max_bytes={spec.max_bytes}', 'too_large')
  is_tiff = data[:4] in _TIFF_MAGIC
  try:
    with Image.open(io.BytesIO(data)) as img:
      _check_pixels(img.width, img.height, spec)
      if is_tiff and _deep_tiff(img):
        img = _decode_tiff(data, spec, fallback=img)
      else:
        if spec.reduced_decode and img.format == 'JPEG':
          _draft(img, spec)
        try:
          img.load()
          img = ImageOps.exif_transpose(img)
        except OSError as e:
          if not is_tiff:
            raise
          img = _decode_tiff(data, spec, pillow_error=e)  # tifffile may read what Pillow can't
      array = _finish(img, data, spec, rng)
  except UnidentifiedImageError:
    if not is_tiff:
      raise ImageDecodeError('not a recognised image format', 'unrecognised') from None
    array = _finish(_decode_tiff(data, spec), data, spec, rng)  # a TIFF Pillow can't open
  except Image.DecompressionBombError as e:
    raise ImageDecodeError(f'decompression bomb: {e}', 'too_many_pixels') from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    if isinstance(e, ImageDecodeError):
      raise
    if 'not available' in str(e) or 'unsupported' in str(e).lower():
      # Recognised, but this Pillow build can't decode it (e.g. "decoder jpeg2k not available").
      raise ImageDecodeError(f'unsupported image encoding: {e}', 'unsupported') from None
    raise ImageDecodeError(f'corrupt or truncated image: {e}') from None
  return array[..., None] if spec.channels == 1 else array


_PIXEL_CHANNELS = (1, 2, 3, 4)  # as Pillow's fromarray reads them: L, LA, RGB, RGBA


def fit_image(pixels: np.ndarray, spec: ImageSpec = ImageSpec(), rng: np.random.Generator | None = None) -> np.ndarray:
  """Already decoded uint8 pixels -> the array `decode_image` makes under `spec`.

  For images stored decoded (the `image/raw` records of
  `beam_dl.formats.image_example`): [H, W] or [H, W, C] with C 1 (grey),
  2 (grey + alpha), 3 (RGB) or 4 (RGBA) get the same mode conversion, alpha
  handling and resize as a lossless file of the same pixels would, without
  an encode/decode round trip. Random crops default to an `rng` seeded from
  `spec.seed` and the pixels.

  Raises:
    ImageDecodeError: not uint8 with 1-4 channels ('unsupported'), no pixels
      ('empty'), or over `spec.max_pixels` ('too_many_pixels').
  """
  pixels = np.asarray(pixels)
  channels = 1 if pixels.ndim == 2 else (pixels.shape[-1] if pixels.ndim == 3 else 0)
  if pixels.dtype != np.uint8 or channels not in _PIXEL_CHANNELS:
    raise ImageDecodeError(
      f'pixels must be uint8 [H, W] or [H, W, 1-4], got {pixels.dtype} {pixels.shape}', 'unsupported'
    )
  if pixels.size == 0:
    raise ImageDecodeError(f'empty image: shape {pixels.shape}', 'empty')
  _check_pixels(pixels.shape[1], pixels.shape[0], spec)
  img = Image.fromarray(pixels.reshape(pixels.shape[:2]) if channels == 1 else pixels)
  if rng is None and spec.crop == 'random':
    rng = rng_for_bytes(pixels.tobytes(), spec.seed)
  array = _finish(img, b'', spec, rng)  # with an rng, _finish never reads the bytes
  return array[..., None] if spec.channels == 1 else array


def _finish(img: Image.Image, data: bytes, spec: ImageSpec, rng: np.random.Generator | None) -> np.ndarray:
  """A loaded image -> spec's mode and size, as a uint8 array."""
  img = _to_mode(img, spec)
  if rng is None and spec.crop == 'random':
    rng = rng_for_bytes(data, spec.seed)
  return np.asarray(_resize(img, spec, rng), dtype=np.uint8)


def _deep_tiff(img: Image.Image) -> bool:
  """A TIFF with samples that are not 8-bit unsigned (Pillow narrows or mangles them)."""

  def tag(number):
    value = img.tag_v2.get(number, ())
    return value if isinstance(value, tuple) else (value,)

  return (
    img.mode in _HIGH_DEPTH_MODES
    or any(b > 8 for b in tag(258))  # BitsPerSample
    or any(f != 1 for f in tag(339))
  )  # SampleFormat: 1 = unsigned int


def _check_pixels(width: int, height: int, spec: ImageSpec) -> None:
  pixels = width * height
  if pixels > spec.max_pixels:
    raise ImageDecodeError(f'{width}x{height} = {pixels} pixels, over max_pixels={spec.max_pixels}', 'too_many_pixels')


def _decode_tiff(
  data: bytes, spec: ImageSpec, fallback: Image.Image | None = None, pillow_error: OSError | None = None
) -> Image.Image:
  """The first page of a TIFF, via tifffile, as an 8-bit Pillow image.

  For what Pillow opens only as 32-bit 'I'/'F' or 16-bit 'I;16' (whose
  original dtype Pillow hides) or cannot open at all (float64, odd sample
  layouts). The first page is the image: a multi-page TIFF is a stack or a
  pyramid, whose first page is the first slice or the full resolution, as
  Pillow's first frame elsewhere. When tifffile cannot decode it (a
  compression that needs the optional imagecodecs package, such as LZW) but
  Pillow could open it, Pillow's own pixels are used (`fallback`); else the
  error names what is unsupported. After Pillow failed to load an 8-bit TIFF
  (`pillow_error`), Pillow's reason stands unless it lacked the decoder:
  a compression it has a decoder for and still failed on is corrupt data.
  """
  import tifffile

  try:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
      page = tif.pages.first
      _check_pixels(page.imagewidth, page.imagelength, spec)
      array, axes = page.asarray(), page.axes
  except ImageDecodeError:
    raise
  except Exception as e:  # tifffile raises ValueError, KeyError, TiffFileError...
    if fallback is not None:
      fallback.load()
      return Image.fromarray(to_uint8(np.asarray(fallback), spec.depth_scaling))
    if pillow_error is not None and 'not available' not in str(pillow_error):
      raise ImageDecodeError(f'corrupt or truncated image: {pillow_error}') from None
    raise ImageDecodeError(*_tiff_reason(e)) from None
  return Image.fromarray(_samples_last(to_uint8(array, spec.depth_scaling), axes))


def _tiff_reason(error: Exception) -> tuple[str, str]:
  """(reason, kind) for a TIFF tifffile can't decode: unsupported, or corrupt."""
  message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  if 'COMPRESSION' in message.upper() or 'imagecodecs' in message:
    return f'unsupported TIFF compression: {message}', 'unsupported'
  return f'corrupt or truncated TIFF: {type(error).__name__}: {message}', 'corrupt'


def _samples_last(array: np.ndarray, axes: str) -> np.ndarray:
  """tifffile's page array (axes like 'YX', 'YXS', 'SYX') -> [H, W] or [H, W, S<=4]."""
  if axes.startswith('S') and array.ndim == 3:  # planar configuration: samples first
    array = np.moveaxis(array, 0, -1)
  array = np.squeeze(array) if array.ndim > 3 else array
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (2, 3, 4)):
    return array
  raise ImageDecodeError(f'unsupported TIFF layout: page of shape {array.shape} (axes {axes})', 'unsupported')


def to_uint8(array: np.ndarray, depth_scaling: str = 'range') -> np.ndarray:
  """Any integer, bool or float pixel array -> uint8, per `ImageSpec.depth_scaling`.

  'range': unsigned ints keep their top 8 bits (x >> (bits - 8)), signed
  ints are offset to unsigned first; 'minmax': each image's min..max ->
  0..255. Floats: x * 255 when all finite values lie in [0, 1], else
  min..max; NaN and infinities become 0.
  """
  if array.dtype == np.uint8:
    return array
  if array.dtype == np.bool_:
    return array.astype(np.uint8) * 255
  if array.dtype.kind == 'f':
    finite = np.isfinite(array)
    values = np.where(finite, array, 0).astype(np.float64)
    lo, hi = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
    if lo >= 0 and hi <= 1:
      return np.rint(values * 255).astype(np.uint8)
    return _stretch(values, lo, hi)
  if array.dtype.kind not in 'iu':
    raise ImageDecodeError(f'unsupported pixel type {array.dtype}', 'unsupported')
  if depth_scaling == 'minmax':
    return _stretch(array.astype(np.float64), float(array.min()), float(array.max()))
  info = np.iinfo(array.dtype)
  unsigned = array.astype(np.int64) - info.min if info.min < 0 else array
  return (unsigned.astype(np.uint64) >> np.uint64(info.bits - 8)).astype(np.uint8)


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
  if hi <= lo:
    return np.zeros(values.shape, np.uint8)
  return np.rint((np.clip(values, lo, hi) - lo) * (255 / (hi - lo))).astype(np.uint8)


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
  has_alpha = img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (img.mode == 'P' and 'transparency' in img.info)
  if has_alpha and spec.alpha == 'composite':
    rgba = img.convert('RGBA')
    canvas = Image.new('RGBA', rgba.size, spec.rgb_background + (255,))
    img = Image.alpha_composite(canvas, rgba)
  elif has_alpha and img.mode in ('P', 'PA'):
    img = img.convert('RGBA')  # palette alpha: resolve colours, then drop alpha below
  elif img.mode.startswith('I;16') or img.mode == 'F':
    img = Image.fromarray(to_uint8(np.asarray(img), spec.depth_scaling))
  elif img.mode == 'I':  # Pillow's 32-bit mode, holding 16-bit PNG samples
    samples = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
    img = Image.fromarray(to_uint8(samples, spec.depth_scaling))
  return img.convert(spec.mode)


def _crop_box(
  size: tuple[int, int], target: tuple[int, int], crop: str, rng: np.random.Generator | None
) -> tuple[int, int, int, int]:
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


def normalize(
  image: np.ndarray, mean: Sequence[float] | float = 0.0, std: Sequence[float] | float = 1.0, scale: float = 1 / 255
) -> np.ndarray:
  """float32 (image * scale - mean) / std, per channel (e.g. ImageNet mean/std)."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  if np.any(std == 0):
    raise ValueError('std must be non-zero')
  return (image.astype(np.float32) * np.float32(scale) - mean) / std
