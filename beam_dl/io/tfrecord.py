"""TFRecord framing, read record by record with damage reported, not raised.

The one TFRecord reader of beam_dl (`transforms.tfrecords.ReadTFRecords`
wraps it per file). A TFRecord file is a run of frames:

  uint64 length (little endian) | uint32 masked crc32c(length bytes)
  | data[length] | uint32 masked crc32c(data)

Beam's `ReadFromTFRecord` raises on the first bad frame, which fails the whole
job and loses every good record of every file. `read_records` instead yields
each good record and, for each damaged frame, one `Damage` naming the byte
offset and what is wrong:

- data CRC mismatch with an intact length header: the frame's extent is known,
  so only that record is lost and reading continues after it;
- length CRC mismatch, or a file cut short (mid-header, mid-data, mid-CRC):
  nothing after it can be framed, so reading stops there.

The crc32c itself is google-crc32c's (installed with apache-beam[gcp]); the
mask is TFRecord's own rotate-and-add, defined by the format.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import BinaryIO, Iterator

import google_crc32c

_HEADER = 12  # uint64 length + uint32 masked crc of it
_FOOTER = 4  # uint32 masked crc of the data
_MASK_DELTA = 0xA282EAD8
_CHUNK = 1 << 20  # data is read in chunks, so a corrupt huge length can't allocate it all
_LENGTH = struct.Struct('<Q')
_CRC = struct.Struct('<I')


@dataclasses.dataclass(frozen=True)
class Damage:
  """A damaged frame at byte `offset` (of the uncompressed stream).

  `recoverable` says whether the records after it were still read.
  """

  offset: int
  reason: str
  recoverable: bool


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked crc32c of `data`."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def encode_record(data: bytes) -> bytes:
  """One framed record (what TFRecordWriter writes); for tests and tools."""
  length = struct.pack('<Q', len(data))
  return length + struct.pack('<I', masked_crc32c(length)) + data + struct.pack('<I', masked_crc32c(data))


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
  """Up to `n` bytes (fewer only at end of stream), read in bounded chunks."""
  if n <= _CHUNK:
    first = stream.read(n)
    if len(first) == n or not first:
      return first
    parts, left = [first], n - len(first)
  else:
    parts, left = [], n
  while left > 0:
    part = stream.read(min(left, _CHUNK))
    if not part:
      break
    parts.append(part)
    left -= len(part)
  return b''.join(parts)


def read_records(stream: BinaryIO) -> Iterator[bytes | Damage]:
  """Yields each record's data, and a `Damage` for each damaged frame.

  I/O errors of the stream itself (a corrupt gzip member, EIO) propagate:
  the caller knows the file and reports them.
  """
  offset = 0
  while True:
    header = _read_exactly(stream, _HEADER)
    if not header:
      return
    if len(header) < _HEADER:
      yield Damage(
        offset, f'truncated: {len(header)} of the {_HEADER} header bytes present, file ends mid-header', False
      )
      return
    length_bytes, (length_crc,) = header[:8], _CRC.unpack_from(header, 8)
    if masked_crc32c(length_bytes) != length_crc:
      yield Damage(offset, 'corrupt length header (length CRC mismatch); the rest of the file cannot be framed', False)
      return
    (length,) = _LENGTH.unpack(length_bytes)
    body = _read_exactly(stream, length + _FOOTER)
    if len(body) < length + _FOOTER:
      yield Damage(
        offset,
        f'truncated: record of {length} bytes, only {len(body)} of its {length + _FOOTER} data+CRC bytes present',
        False,
      )
      return
    data, (data_crc,) = body[:length], _CRC.unpack_from(body, length)
    if masked_crc32c(data) != data_crc:
      yield Damage(
        offset, f'corrupt record of {length} bytes (data CRC mismatch); skipped, the records after it were read', True
      )
    else:
      yield data
    offset += _HEADER + length + _FOOTER
