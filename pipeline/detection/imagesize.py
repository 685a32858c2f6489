"""Pixel size of a JPEG or PNG body, read from its header without decoding.

Frames are checked with `image_size` before they are decoded, so that a decompression
bomb (a small body that claims a huge pixel size) or a frame whose real size differs from
its metadata is refused without paying for the decode.

Only the header is read: for PNG the IHDR chunk, which must come first; for JPEG the
marker segments up to the first SOF (start of frame), each skipped by its length, never
the compressed data after SOS. Any input that does not parse, including truncated headers
and zero sizes, gives None; nothing raises.
"""

from __future__ import annotations

import re
import struct

__all__ = ["image_size"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Length 13 and type IHDR: the chunk every PNG must start with.
_PNG_IHDR_HEAD = b"\x00\x00\x00\x0dIHDR"
# PNG sizes are unsigned 32-bit but limited to 2**31 - 1 by the specification.
_PNG_MAX_SIZE = 2**31 - 1

_JPEG_SOI = b"\xff\xd8"
# Start-of-frame markers: baseline, extended, progressive, lossless, in their
# Huffman/arithmetic and differential variants. C4 (DHT), C8 (JPG) and CC (DAC) are not.
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_JPEG_SOS = 0xDA
_JPEG_EOI = 0xD9
# Markers that stand alone, without a length: TEM and RST0-RST7 (SOI is refused apart).
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
# One marker: its 0xFF prefix, any 0xFF fill bytes, then the marker code.
_JPEG_MARKER = re.compile(rb"\xff++([\x00-\xfe])")
# Real files have a few dozen segments before SOF; more is refused, which bounds the work
# on a body made of millions of tiny segments.
_JPEG_MAX_SEGMENTS = 1024


def image_size(body: bytes) -> tuple[int, int] | None:
    """(width, height) read from a JPEG or PNG header without decoding; None if unreadable."""
    if body[:8] == _PNG_SIGNATURE:
        return _png_size(body)
    if body[:2] == _JPEG_SOI:
        return _jpeg_size(body)
    return None


def _png_size(body: bytes) -> tuple[int, int] | None:
    """Size from the IHDR chunk right after the signature."""
    if len(body) < 24 or body[8:16] != _PNG_IHDR_HEAD:
        return None
    width, height = struct.unpack_from(">II", body, 16)
    return _valid(width, height, _PNG_MAX_SIZE)


def _jpeg_size(body: bytes) -> tuple[int, int] | None:
    """Size from the first SOF segment, walking the segments that come before it."""
    end = len(body)
    pos = 2  # after SOI
    for _ in range(_JPEG_MAX_SEGMENTS):
        match = _JPEG_MARKER.match(body, pos)
        if match is None:
            return None  # truncated, or stray bytes where a marker should be
        marker = match[1][0]
        pos = match.end()
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (_JPEG_SOS, _JPEG_EOI, 0x00, 0xD8):
            # Image data or end without a frame header; 0x00 (a stuffed byte) and a
            # second SOI are not valid here.
            return None
        if pos + 2 > end:
            return None
        (length,) = struct.unpack_from(">H", body, pos)
        if length < 2 or pos + length > end:
            return None
        if marker in _JPEG_SOF:
            # Length, precision (1), height (2), width (2), component count (1), ...
            if length < 8:
                return None
            height, width = struct.unpack_from(">HH", body, pos + 3)
            return _valid(width, height, 0xFFFF)
        pos += length
    return None


def _valid(width: int, height: int, limit: int) -> tuple[int, int] | None:
    """(width, height) when both are in 1..limit, else None."""
    if 0 < width <= limit and 0 < height <= limit:
        return width, height
    return None
