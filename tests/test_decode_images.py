"""Image decoding on real bytes: every Pillow format, modes, EXIF, resize/crop, guards.

Real pictures (scikit-image's cat and astronaut, scikit-learn's digits)
encoded by Pillow or tifffile; decode_image, then the Beam transforms.
"""

import io
import os
import struct
import zlib

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image
from skimage import data as skdata

from beam_dl.decoding import images
from beam_dl.decoding.images import ImageDecodeError, ImageSpec, decode_image
from tests.imaging import digits_uint8, encode, truncated_jpeg
from transforms import images as image_transforms

GRAY = ImageSpec(height=8, width=8, channels=1)


@pytest.fixture(scope='module')
def digit():
  """One 8x8 grayscale digit."""
  digits, _ = digits_uint8()
  return digits[0]


@pytest.fixture(scope='module')
def photo():
  return Image.fromarray(skdata.chelsea())  # 451x300 RGB cat


def _gradient(w=40, h=30):
  x = np.linspace(0, 255, w, dtype=np.uint8)
  return np.ascontiguousarray(np.stack([np.tile(x, (h, 1))] * 3, axis=-1))


def _bomb_png(width=100_000, height=100_000) -> bytes:
  """A real 1x1 PNG whose IHDR claims width x height (CRC fixed up)."""
  png = bytearray(encode(Image.new('L', (1, 1)), 'PNG'))
  ihdr = 8 + 8  # signature + length/type
  png[ihdr : ihdr + 8] = struct.pack('>II', width, height)
  png[ihdr + 13 : ihdr + 17] = struct.pack('>I', zlib.crc32(bytes(png[ihdr - 4 : ihdr + 13])))
  return bytes(png)


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


def test_every_format_decodes_to_rgb_uint8(photo):
  small = photo.resize((64, 48))
  frames = [Image.new('RGB', (64, 48), c) for c in ((255, 0, 0), (0, 0, 255))]
  encoded = {
    'jpeg': encode(small, 'JPEG', quality=95),
    'png': encode(small, 'PNG'),
    'webp': encode(small, 'WEBP', lossless=True),
    'bmp': encode(small, 'BMP'),
    'tiff': encode(small, 'TIFF'),
    'gif_first_frame': encode(frames[0], 'GIF', save_all=True, append_images=frames[1:]),
    'tiff_first_page': encode(frames[0], 'TIFF', save_all=True, append_images=frames[1:]),
  }
  ref = np.asarray(small)
  for name, blob in encoded.items():
    out = decode_image(blob, ImageSpec())
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3), name
    if name in ('png', 'webp', 'bmp', 'tiff'):
      np.testing.assert_array_equal(out, ref, err_msg=name)
    elif name == 'jpeg':
      assert np.abs(out.astype(int) - ref).mean() < 3
    else:  # first frame / page is red, not blue
      assert out[..., 0].mean() > 250 and out[..., 2].mean() < 5, name


def test_modes_are_normalised():
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, :2, 3] = 255  # left half opaque red, right half transparent
  rgba_png = encode(Image.fromarray(rgba, 'RGBA'), 'PNG')
  white = decode_image(rgba_png, ImageSpec(background=(255, 255, 255)))
  np.testing.assert_array_equal(white[0, 0], [200, 0, 0])
  np.testing.assert_array_equal(white[0, 3], [255, 255, 255])
  blue = decode_image(rgba_png, ImageSpec(background=(0, 0, 255)))
  np.testing.assert_array_equal(blue[0, 3], [0, 0, 255])
  dropped = decode_image(rgba_png, ImageSpec(alpha='drop', background=255))
  np.testing.assert_array_equal(dropped[0, 3], [200, 0, 0])  # colour under the alpha kept

  la = Image.fromarray(np.stack([np.full((2, 2), 100, np.uint8), np.array([[255, 0], [255, 0]], np.uint8)], -1), 'LA')
  gray = decode_image(encode(la, 'PNG'), ImageSpec(channels=1, background=255))
  assert gray.shape == (2, 2, 1) and gray[0, 0, 0] == 100 and gray[0, 1, 0] == 255

  pal = Image.new('P', (2, 2), 1)
  pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
  np.testing.assert_array_equal(decode_image(encode(pal, 'PNG'))[0, 0], [10, 20, 30])

  cmyk = Image.new('CMYK', (8, 8), (0, 255, 255, 0))  # pure red in CMYK
  red = decode_image(encode(cmyk, 'JPEG', quality=100))
  assert red[..., 0].mean() > 240 and red[..., 1:].mean() < 20

  i16 = Image.fromarray(np.full((3, 3), 0x8000, np.uint16))
  assert i16.mode.startswith('I;16')
  np.testing.assert_array_equal(decode_image(encode(i16, 'PNG'), ImageSpec(channels=1)), 128)


def test_exif_orientation_is_applied():
  img = Image.fromarray(_gradient(40, 30))  # dark left, bright right
  exif = Image.Exif()
  exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
  out = decode_image(encode(img, 'JPEG', quality=95, exif=exif.tobytes()))
  assert out.shape == (40, 30, 3)
  assert out[0].mean() < out[-1].mean()  # left edge is now on top
  # With reduced-size decoding the transposed output size is still honoured.
  small = decode_image(encode(img, 'JPEG', exif=exif.tobytes()), ImageSpec(height=20, width=15))
  assert small.shape == (20, 15, 3)


def test_resize_fits_and_crops(photo):
  blob = encode(photo, 'PNG')  # 451x300
  assert decode_image(blob, ImageSpec(height=50, width=60)).shape == (50, 60, 3)
  short = decode_image(blob, ImageSpec(shorter_side=100))
  assert short.shape == (100, 150, 3)  # aspect kept
  center = decode_image(blob, ImageSpec(shorter_side=100, height=64, width=64))
  assert center.shape == (64, 64, 3)
  np.testing.assert_array_equal(center, short[18:82, 43:107])
  cover = decode_image(blob, ImageSpec(height=64, width=64, fit='cover'))
  assert cover.shape == (64, 64, 3)
  contain = decode_image(blob, ImageSpec(height=64, width=64, fit='contain', background=(0, 255, 0)))
  assert contain.shape == (64, 64, 3)
  np.testing.assert_array_equal(contain[0, 0], [0, 255, 0])  # letterbox band
  assert (contain[:, :, 1] != 255).any(axis=1).sum() in (42, 43)  # 300/451*64 rows of photo

  spec = ImageSpec(height=64, width=64, fit='cover', crop='random', seed=1)
  crops = [decode_image(blob, spec, images.rng_for_key(f'k{i}', 1)) for i in range(4)]
  assert len({c.tobytes() for c in crops}) > 1  # different keys, different crops
  np.testing.assert_array_equal(crops[0], decode_image(blob, spec, images.rng_for_key('k0', 1)))
  np.testing.assert_array_equal(decode_image(blob, spec), decode_image(blob, spec))


def test_reduced_size_jpeg_decoding_matches_full_decode():
  big = Image.fromarray(skdata.astronaut()).resize((1024, 1024))
  blob = encode(big, 'JPEG', quality=90)
  spec = ImageSpec(height=128, width=128)
  drafted = decode_image(blob, spec)
  full = decode_image(blob, ImageSpec(height=128, width=128, reduced_decode=False))
  assert drafted.shape == full.shape == (128, 128, 3)
  assert np.abs(drafted.astype(int) - full).mean() < 6  # same picture, a fraction of the work


def test_normalize():
  img = np.array([[[0, 255, 51]]], np.uint8)
  out = images.normalize(img, mean=(0.0, 0.5, 0.2), std=(1.0, 0.5, 0.2))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], [0.0, 1.0, 0.0], atol=1e-6)
  with pytest.raises(ValueError):
    images.normalize(img, std=0.0)


@pytest.mark.parametrize(
  'blob,kind,reason',
  [
    (b'', 'empty', 'empty input'),
    (b'hello, I am a text file named photo.jpg\n', 'unrecognised', 'not a recognised image'),
    (None, 'corrupt', 'truncated'),  # truncated JPEG, built below
    (_bomb_png(10_000, 10_000), 'too_many_pixels', '10000x10000 = 100000000 pixels, over max_pixels'),
    (_bomb_png(100_000, 100_000), 'too_many_pixels', 'decompression bomb'),  # Pillow's own guard
  ],
  ids=['zero_bytes', 'text_named_jpg', 'truncated_jpeg', 'bomb_header', 'huge_bomb_header'],
)
def test_broken_inputs_raise_with_reason(photo, blob, kind, reason):
  if blob is None:
    full = encode(photo, 'JPEG')
    blob = full[: len(full) // 2]
  with pytest.raises(ImageDecodeError, match=reason) as err:
    decode_image(blob, ImageSpec())
  assert err.value.kind == kind


def test_truncated_jpeg_is_corrupt_when_resized_on_decode_too():
  """The reduced-size (draft) decode path reports a cut-off JPEG the same way."""
  with pytest.raises(ImageDecodeError) as err:
    decode_image(truncated_jpeg(), GRAY)
  assert err.value.kind == 'corrupt' and str(err.value)


def test_max_bytes_guard(photo):
  with pytest.raises(ImageDecodeError, match='over max_bytes') as err:
    decode_image(encode(photo, 'PNG'), ImageSpec(max_bytes=1000))
  assert err.value.kind == 'too_large'


def test_max_pixels_guard_refuses_a_real_image_before_decoding():
  big = encode(np.zeros((100, 100), np.uint8), 'PNG')
  with pytest.raises(ImageDecodeError, match='max_pixels') as error:
    decode_image(big, ImageSpec(max_pixels=99 * 99))
  assert error.value.kind == 'too_many_pixels'


def test_spec_validation():
  for bad in (
    dict(fit='squash'),
    dict(crop='left'),
    dict(alpha='keep'),
    dict(channels=2),
    dict(height=3),
    dict(background=(1, 2)),
  ):
    with pytest.raises(ValueError):
      ImageSpec(**bad)


def test_read_and_decode_files_pipeline_with_dead_letters(tmp_path, photo):
  small = photo.resize((40, 30))
  files = {
    'a.jpg': encode(small, 'JPEG'),
    'b.png': encode(small.convert('RGBA'), 'PNG'),
    'c.webp': encode(small, 'WEBP'),
    'd.gif': encode(small, 'GIF'),
    'e.bmp': encode(small, 'BMP'),
    'f.tif': encode(small, 'TIFF'),
    'text.jpg': b'not an image at all',
    'zero.png': b'',
    'truncated.jpg': encode(photo, 'JPEG')[:3000],
    'bomb.png': _bomb_png(20_000, 5_000),
  }
  for name, blob in files.items():
    (tmp_path / name).write_bytes(blob)
  spec = ImageSpec(height=16, width=16, max_pixels=10_000_000)
  with TestPipeline(runner='FnApiRunner') as p:
    read = p | image_transforms.ReadImageFiles(
      os.path.join(tmp_path, '*'), with_metadata=True, label_fn=lambda path: int(os.path.basename(path) < 'c')
    )
    out = read.images | image_transforms.DecodeImages(spec)
    assert_that(read.failed, equal_to([]), label='read_failed')
    assert_that(
      out.decoded
      | beam.Map(lambda e: (os.path.basename(e[0]), e[1].shape, e[2]['label'], os.path.basename(e[2]['path']))),
      equal_to([(n, (16, 16, 3), int(n < 'c'), n) for n in ('a.jpg', 'b.png', 'c.webp', 'd.gif', 'e.bmp', 'f.tif')]),
      label='decoded',
    )
    assert_that(
      out.failed | beam.Map(lambda d: (os.path.basename(d['key']), d['stage'], d['reason'].split(' ')[0])),
      equal_to(
        [
          ('text.jpg', 'decode', 'not'),
          ('zero.png', 'decode', 'empty'),
          ('truncated.jpg', 'decode', 'corrupt'),
          ('bomb.png', 'decode', '20000x5000'),
        ]
      ),
      label='failed',
    )


def test_deferred_read_gives_the_outputs_and_dead_letters_of_reading_first(tmp_path, photo):
  """ReadImageFiles(defer_read=True) hands DecodeImages the files to read on
  its decode thread: same images, and a FIFO that matches the glob is the
  same 'read' dead letter (from the decode step instead of the read step)."""
  small = photo.resize((40, 30))
  (tmp_path / 'a.jpg').write_bytes(encode(small, 'JPEG'))
  (tmp_path / 'b.png').write_bytes(encode(small, 'PNG'))
  (tmp_path / 'text.jpg').write_bytes(b'not an image at all')
  os.mkfifo(tmp_path / 'pipe.png')
  os.symlink(tmp_path / 'nowhere.png', tmp_path / 'gone.png')
  spec = ImageSpec(height=16, width=16)
  with TestPipeline(runner='FnApiRunner') as p:
    for defer in (False, True):
      read = p | f'Read{defer}' >> image_transforms.ReadImageFiles(os.path.join(tmp_path, '*'), defer_read=defer)
      out = read.images | f'Decode{defer}' >> image_transforms.DecodeImages(spec, ahead=2)
      assert_that(
        out.decoded | f'Pixels{defer}' >> beam.Map(lambda e: (os.path.basename(e[0]), int(e[1].sum()))),
        equal_to(
          [
            ('a.jpg', int(decode_image(encode(small, 'JPEG'), spec).sum())),
            ('b.png', int(decode_image(encode(small, 'PNG'), spec).sum())),
          ]
        ),
        label=f'decoded{defer}',
      )
      failed = (read.failed, out.failed) | f'Failed{defer}' >> beam.Flatten()
      assert_that(
        failed
        | f'Reasons{defer}' >> beam.Map(lambda d: (os.path.basename(d['key']), d['stage'], d['reason'].split(' (')[0])),
        equal_to(
          [
            ('gone.png', 'read', 'dangling symlink'),
            ('pipe.png', 'read', 'not a regular file: a FIFO'),
            ('text.jpg', 'decode', 'not a recognised image format'),
          ]
        ),
        label=f'failed{defer}',
      )


def test_normalize_images_transform_keeps_key_and_metadata():
  arr = np.full((2, 2, 3), 255, np.uint8)
  with TestPipeline(runner='FnApiRunner') as p:
    out = p | beam.Create([('k', arr, {'label': 3})]) | image_transforms.NormalizeImages(mean=0.5, std=0.5)
    assert_that(
      out | beam.Map(lambda e: (e[0], e[1].dtype.name, float(e[1].max()), e[2])),
      equal_to([('k', 'float32', 1.0, {'label': 3})]),
    )


def test_image_examples_with_labels_decode_and_write_for_training(tmp_path, photo):
  """TFRecord of encoded Examples -> decode (label kept) -> TFRecord of decoded Examples."""
  import tensorflow as tf

  from beam_dl.formats.image_example import decode_image_examples
  from beam_dl.formats.image_example import encode_file_example as example
  from transforms import tfrecords

  src = os.path.join(tmp_path, 'encoded.tfrecord')
  with tf.io.TFRecordWriter(src) as writer:
    writer.write(example('cat', encode(photo, 'JPEG'), 3))
    writer.write(example('unlabelled', encode(photo, 'PNG')))
    writer.write(example('broken', b'GIF89a truncated', 1))
  prefix = os.path.join(tmp_path, 'decoded')
  with TestPipeline(runner='FnApiRunner') as p:
    read = p | image_transforms.ReadImageExamples(src, with_metadata=True)
    out = read.images | image_transforms.DecodeImages(ImageSpec(shorter_side=32, height=32, width=32))
    _ = out.decoded | tfrecords.WriteImageExamples(prefix, num_shards=1)
    assert_that(
      out.failed | beam.Map(lambda d: (d['key'], d['stage'])), equal_to([('broken', 'decode')]), label='failed'
    )
    assert_that(
      out.decoded | beam.Map(lambda e: (e[0], e[2]['label'], e[2]['source'] == src)),
      equal_to([('cat', 3, True), ('unlabelled', None, True)]),
      label='meta',
    )
  records = [r.numpy() for r in tf.data.TFRecordDataset(tf.io.gfile.glob(prefix + '-*'))]
  got = {k: (a.shape, label) for k, a, label in decode_image_examples(records)}
  assert got == {'cat': ((32, 32, 3), 3), 'unlabelled': ((32, 32, 3), -1)}


# -- TIFFs as scientific, industrial and medical imaging write them (tifffile) --


def _tiff(array, **kwargs) -> bytes:
  import tifffile

  buffer = io.BytesIO()
  tifffile.imwrite(buffer, array, **kwargs)
  return buffer.getvalue()


_RAMP16 = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 256 + 255).astype(np.uint16)


@pytest.mark.parametrize(
  'name, blob, spec, expected',
  [
    # uint16 by the dtype range: the top 8 bits, as 16-bit PNGs.
    ('uint16', _tiff(_RAMP16), ImageSpec(channels=1), (_RAMP16 >> 8).astype(np.uint8)),
    # 12-bit data in uint16 stretched per image.
    (
      'uint16 minmax',
      _tiff(np.array([[0, 1024], [2048, 4095]], np.uint16)),
      ImageSpec(channels=1, depth_scaling='minmax'),
      np.array([[0, 64], [128, 255]], np.uint8),
    ),
    (
      'int16',
      _tiff(np.array([[-32768, 0], [255, 32767]], np.int16)),
      ImageSpec(channels=1),
      np.array([[0, 128], [128, 255]], np.uint8),
    ),
    ('uint32', _tiff(np.array([[0, 2**32 - 1]], np.uint32)), ImageSpec(channels=1), np.array([[0, 255]], np.uint8)),
    (
      'float32 in [0, 1]',
      _tiff(np.array([[0, 0.5], [1, np.nan]], np.float32)),
      ImageSpec(channels=1),
      np.array([[0, 128], [255, 0]], np.uint8),
    ),
    (
      'float32 wide range',
      _tiff(np.array([[-100, 0], [140, 300]], np.float32)),
      ImageSpec(channels=1),
      np.array([[0, 64], [153, 255]], np.uint8),
    ),
    (
      'float64 (Pillow cannot open)',
      _tiff(np.full((2, 2), 0.25)),
      ImageSpec(channels=1),
      np.full((2, 2), 64, np.uint8),
    ),
    (
      'multi-page: the first page',
      _tiff(np.stack([np.full((4, 4), v, np.uint16) for v in (512, 60000, 9)]), photometric='minisblack'),
      ImageSpec(channels=1),
      np.full((4, 4), 2, np.uint8),
    ),
    (
      'planar 16-bit RGB',
      _tiff(
        np.stack([np.full((3, 3), v, np.uint16) for v in (65535, 0, 32768)]), photometric='rgb', planarconfig='separate'
      ),
      ImageSpec(channels=3),
      np.broadcast_to(np.array([255, 0, 128], np.uint8), (3, 3, 3)),
    ),
  ],
)
def test_deep_tiffs_decode_to_uint8(name, blob, spec, expected):
  got = decode_image(blob, spec)
  np.testing.assert_array_equal(got[..., 0] if spec.channels == 1 else got, expected, err_msg=name)


def test_tiff_with_unsupported_compression_says_so():
  import tifffile

  blob = bytearray(_tiff(np.zeros((8, 8), np.uint16)))
  with tifffile.TiffFile(io.BytesIO(bytes(blob))) as t:
    at = t.pages.first.tags['Compression'].valueoffset
  blob[at : at + 2] = (34712).to_bytes(2, 'little')  # JPEG 2000: needs imagecodecs
  with pytest.raises(ImageDecodeError, match='unsupported TIFF compression.*JPEG2000') as err:
    decode_image(bytes(blob), ImageSpec(channels=1))
  assert err.value.kind == 'unsupported'


def test_lzw_16bit_tiff_that_only_pillow_decodes_uses_the_dtype_range():
  """tifffile needs imagecodecs for LZW; Pillow decodes it, with the same scaling."""
  blob = encode(np.full((4, 4), 40000, np.uint16), 'TIFF', compression='tiff_lzw')
  np.testing.assert_array_equal(decode_image(blob, ImageSpec(channels=1)), np.full((4, 4, 1), 40000 >> 8, np.uint8))


def test_depth_scaling_is_validated():
  with pytest.raises(ValueError, match='depth_scaling'):
    ImageSpec(depth_scaling='log')
