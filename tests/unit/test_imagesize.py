"""`image_size` reads JPEG and PNG sizes from their headers and never raises."""

from __future__ import annotations

import struct
import time

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.detection.imagesize import image_size

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZES = [(1, 1), (2, 3), (641, 479), (640, 480), (1920, 1080), (4000, 3000)]


def encode(ext: str, image: np.ndarray, *params: int) -> bytes:
    ok, buffer = cv2.imencode(ext, image, list(params))
    assert ok
    return buffer.tobytes()


def color(width: int, height: int) -> np.ndarray:
    return np.zeros((height, width, 3), np.uint8)


def gray(width: int, height: int) -> np.ndarray:
    return np.zeros((height, width), np.uint8)


def segment(marker: int, payload: bytes) -> bytes:
    """A JPEG marker segment: FF, marker, big-endian length (itself included), payload."""
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def sof(marker: int, width: int, height: int) -> bytes:
    """A one-component frame header: precision 8, height, width, component 1."""
    return segment(marker, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")


def after_soi(jpeg: bytes, inserted: bytes) -> bytes:
    assert jpeg[:2] == SOI
    return SOI + inserted + jpeg[2:]


@pytest.fixture(scope="module")
def small_jpeg() -> bytes:
    return encode(".jpg", color(37, 23))


@pytest.fixture(scope="module")
def small_png() -> bytes:
    return encode(".png", color(37, 23))


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_jpeg(width: int, height: int) -> None:
    assert image_size(encode(".jpg", color(width, height))) == (width, height)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_progressive_jpeg(width: int, height: int) -> None:
    body = encode(".jpg", color(width, height), cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    assert b"\xff\xc2" in body  # really progressive: SOF2
    assert image_size(body) == (width, height)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_grayscale_jpeg(width: int, height: int) -> None:
    assert image_size(encode(".jpg", gray(width, height))) == (width, height)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_png(width: int, height: int) -> None:
    assert image_size(encode(".png", color(width, height))) == (width, height)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_grayscale_png(width: int, height: int) -> None:
    assert image_size(encode(".png", gray(width, height))) == (width, height)


def test_bytearray_and_memoryview(small_jpeg: bytes, small_png: bytes) -> None:
    for body in (small_jpeg, small_png):
        assert image_size(bytearray(body)) == (37, 23)  # type: ignore[arg-type]
        assert image_size(memoryview(body)) == (37, 23)  # type: ignore[arg-type]


def test_jpeg_with_exif_and_comment_before_sof() -> None:
    jpeg = encode(".jpg", color(641, 479))
    exif = segment(0xE1, b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + bytes(200))
    comment = segment(0xFE, b"camera 7, \xff\xc0 inside a comment is not a frame header")
    body = after_soi(jpeg, exif + comment)
    assert image_size(body) == (641, 479)
    # OpenCV agrees the result is still a valid JPEG of that size.
    decoded = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None
    assert decoded.shape[:2] == (479, 641)


def test_jpeg_fill_bytes_and_standalone_markers() -> None:
    jpeg = encode(".jpg", color(320, 200))
    # Fill bytes before a marker, TEM and RST0-RST7 (no length), then fill before SOF.
    standalone = b"\xff\xff\xff\xff\x01" + b"".join(bytes([0xFF, m]) for m in range(0xD0, 0xD8))
    body = after_soi(jpeg, standalone + b"\xff\xff\xff")
    assert image_size(body) == (320, 200)


@pytest.mark.parametrize("marker", [0xC4, 0xC8, 0xCC])
def test_jpeg_non_sof_c_markers_are_skipped(marker: int) -> None:
    # DHT, JPG and DAC sit among the SOF codes but are not frame headers: a payload that
    # would read as 9999x9999 must be skipped by its length.
    fake = segment(marker, struct.pack(">BHHB", 8, 9999, 9999, 1) + bytes(3))
    body = SOI + fake + sof(0xC0, 12, 34) + EOI
    assert image_size(body) == (12, 34)


@pytest.mark.parametrize(
    "marker", [0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF]
)
def test_every_sof_marker(marker: int) -> None:
    assert image_size(SOI + sof(marker, 800, 600)) == (800, 600)


def test_huge_sof_reported_without_decoding() -> None:
    body = SOI + sof(0xC0, 65535, 65535)
    start = time.perf_counter()
    assert image_size(body) == (65535, 65535)
    assert time.perf_counter() - start < 0.01


def test_first_sof_wins() -> None:
    assert image_size(SOI + sof(0xC0, 10, 20) + sof(0xC2, 30, 40)) == (10, 20)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(SOI + sof(0xC0, 0, 10), id="zero width"),
        pytest.param(SOI + sof(0xC0, 10, 0), id="zero height (DNL)"),
        pytest.param(SOI + EOI + sof(0xC0, 10, 10), id="EOI before SOF"),
        pytest.param(SOI + segment(0xDA, bytes(10)) + sof(0xC0, 10, 10), id="SOS before SOF"),
        pytest.param(SOI + SOI + sof(0xC0, 10, 10), id="second SOI"),
        pytest.param(SOI + b"\xff\x00" + sof(0xC0, 10, 10), id="stuffed zero as marker"),
        pytest.param(SOI + b"\x00" + sof(0xC0, 10, 10), id="garbage between segments"),
        pytest.param(SOI + b"\xff\xe0\x00\x01" + sof(0xC0, 10, 10), id="length below 2"),
        pytest.param(SOI + b"\xff\xe0\xff\xff" + sof(0xC0, 10, 10), id="length past the end"),
        pytest.param(SOI + b"\xff\xc0\x00\x05\x08\x00\x0a", id="SOF too short"),
        pytest.param(SOI, id="SOI only"),
        pytest.param(SOI + b"\xff" * 1000, id="fill bytes to the end"),
        pytest.param(b"\xff\xd9" + sof(0xC0, 10, 10), id="no SOI"),
        pytest.param(b"", id="empty"),
        pytest.param(b"GIF89a\x01\x00\x01\x00", id="GIF"),
    ],
)
def test_unreadable_jpeg(body: bytes) -> None:
    assert image_size(body) is None


def test_compressed_data_after_sos_is_not_scanned() -> None:
    # SOF markers after SOS are entropy-coded data, not a frame header.
    body = SOI + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + sof(0xC0, 10, 10) * 1000
    assert image_size(body) is None


def test_png_wrong_first_chunk(small_png: bytes) -> None:
    # A valid ancillary chunk first: IHDR must be first, so this is refused.
    gama = struct.pack(">I", 4) + b"gAMA" + struct.pack(">I", 45455) + bytes(4)
    assert image_size(PNG_SIGNATURE + gama + small_png[8:]) is None
    # IHDR with the wrong length.
    bad_length = PNG_SIGNATURE + struct.pack(">I", 12) + small_png[12:]
    assert image_size(bad_length) is None
    # Lower-case type.
    assert image_size(PNG_SIGNATURE + small_png[8:12] + b"ihdr" + small_png[16:]) is None


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (0, 5, None),
        (5, 0, None),
        (2**31 - 1, 2**31 - 1, (2**31 - 1, 2**31 - 1)),
        (2**31, 5, None),
        (5, 2**32 - 1, None),
    ],
)
def test_png_size_limits(width: int, height: int, expected: tuple[int, int] | None) -> None:
    ihdr = struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    assert image_size(PNG_SIGNATURE + ihdr + bytes(4)) == expected


def test_every_prefix_of_jpeg(small_jpeg: bytes) -> None:
    sizes = {image_size(small_jpeg[:n]) for n in range(len(small_jpeg) + 1)}
    assert sizes == {None, (37, 23)}


def test_every_prefix_of_png(small_png: bytes) -> None:
    sizes = {image_size(small_png[:n]) for n in range(len(small_png) + 1)}
    assert sizes == {None, (37, 23)}
    assert image_size(small_png[:23]) is None
    assert image_size(small_png[:24]) == (37, 23)


def test_hostile_bodies_are_cheap() -> None:
    eight_mib = 8 * 1024 * 1024
    bodies = [
        SOI + b"\xff" * eight_mib,  # fill bytes only
        SOI + b"\xff\xfe\x00\x02" * (eight_mib // 4),  # millions of empty comments
        SOI + b"\xff\xd0" * (eight_mib // 2),  # millions of RST markers
        SOI + segment(0xE1, bytes(65533)) * (eight_mib // 65537),  # max-size APP1s
    ]
    start = time.perf_counter()
    for body in bodies:
        assert image_size(body) is None
    assert time.perf_counter() - start < 0.2


@given(st.binary(max_size=512))
def test_random_bytes_never_raise(body: bytes) -> None:
    check(image_size(body))


@given(st.sampled_from([SOI, PNG_SIGNATURE, PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR"]), st.binary())
@settings(max_examples=200)
def test_random_bytes_after_a_signature_never_raise(head: bytes, tail: bytes) -> None:
    check(image_size(head + tail))


@given(st.lists(st.sampled_from([0x01, 0xC0, 0xC2, 0xC4, 0xD0, 0xD9, 0xDA, 0xE0, 0xFE, 0xFF])))
def test_random_marker_soup_never_raises(markers: list[int]) -> None:
    body = SOI + b"".join(bytes([0xFF, m, 0x00, 0x08, 8, 0, 1, 0, 1]) for m in markers)
    check(image_size(body))


def check(size: tuple[int, int] | None) -> None:
    if size is not None:
        width, height = size
        assert isinstance(width, int)
        assert isinstance(height, int)
        assert width > 0
        assert height > 0
