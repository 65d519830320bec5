"""decode_image on real encoded bytes: formats, modes, resizing, guards."""
import numpy as np
import pytest

from beam_dl.io.images import ImageDecodeError, ImageSpec, decode_image
from tests.imaging import TEXT_NAMED_JPG, digits_uint8, encode, truncated_jpeg

GRAY = ImageSpec(height=8, width=8, channels=1)


@pytest.fixture(scope='module')
def digit():
  images, _ = digits_uint8()
  return images[0]


def test_png_is_lossless(digit):
  assert np.array_equal(decode_image(encode(digit, 'PNG'), GRAY)[..., 0], digit)


def test_jpeg_decodes_close_to_source(digit):
  decoded = decode_image(encode(digit, 'JPEG', quality=95), GRAY)[..., 0].astype(int)
  assert decoded.shape == (8, 8)
  assert np.abs(decoded - digit).mean() < 8


def test_rgb_png_to_grayscale_uses_luma(digit):
  rgb = np.stack([digit] * 3, axis=-1)
  assert np.array_equal(decode_image(encode(rgb, 'PNG'), GRAY)[..., 0], digit)


def test_rgba_alpha_is_composited_onto_background(digit):
  rgba = np.dstack([np.stack([digit] * 3, -1), np.full((8, 8), 255, np.uint8)])
  rgba[0, 0, 3] = 0  # one fully transparent pixel
  decoded = decode_image(encode(rgba, 'PNG'), ImageSpec(8, 8, channels=1, background=0))[..., 0]
  assert decoded[0, 0] == 0
  assert np.array_equal(decoded.ravel()[1:], digit.ravel()[1:])


def test_grayscale_to_rgb_and_resize(digit):
  decoded = decode_image(encode(digit, 'PNG'), ImageSpec(height=16, width=12, channels=3))
  assert decoded.shape == (16, 12, 3) and decoded.dtype == np.uint8
  assert np.array_equal(decoded[..., 0], decoded[..., 2])


def test_no_size_keeps_decoded_size():
  image = np.arange(30 * 20 * 3, dtype=np.uint8).reshape(30, 20, 3)
  assert decode_image(encode(image, 'PNG')).shape == (30, 20, 3)


@pytest.mark.parametrize(
    'data, kind',
    [
        (b'', 'empty'),
        (TEXT_NAMED_JPG, 'unrecognised'),
        (truncated_jpeg(), 'corrupt'),
    ],
)
def test_bad_bytes_raise_with_reason(data, kind):
  with pytest.raises(ImageDecodeError) as error:
    decode_image(data, GRAY)
  assert error.value.kind == kind
  assert str(error.value)


def test_guards_refuse_before_decoding():
  big = encode(np.zeros((100, 100), np.uint8), 'PNG')
  with pytest.raises(ImageDecodeError, match='max_pixels') as error:
    decode_image(big, ImageSpec(max_pixels=99 * 99))
  assert error.value.kind == 'too_many_pixels'
  with pytest.raises(ImageDecodeError, match='max_bytes'):
    decode_image(big, ImageSpec(max_bytes=len(big) - 1))


def test_spec_validates_arguments():
  with pytest.raises(ValueError):
    ImageSpec(channels=2)
  with pytest.raises(ValueError):
    ImageSpec(height=8)
