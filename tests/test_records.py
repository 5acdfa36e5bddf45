"""Every kind of bad record is fixed up or rejected with its reason, never crashes."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
from helpers import decompression_bomb_png
from PIL import Image

from parti.tasks import records


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def test_rgb_jpeg_and_png_decode():
  pixels = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
  decoded = records.decode_image(_encode(Image.fromarray(pixels)))
  np.testing.assert_array_equal(decoded, pixels)
  assert records.decode_image(_encode(Image.fromarray(pixels), "JPEG")).shape == (40, 50, 3)


def test_grayscale_becomes_rgb():
  gray = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(32, 32)
  decoded = records.decode_image(_encode(Image.fromarray(gray)))
  assert decoded.shape == (32, 32, 3)
  np.testing.assert_array_equal(decoded[..., 0], gray)
  np.testing.assert_array_equal(decoded[..., 2], gray)


def test_rgba_is_composited_over_white():
  rgba = np.zeros((32, 32, 4), np.uint8)
  rgba[..., 0] = 200  # Red everywhere...
  rgba[:16, :, 3] = 255  # ...opaque on the top half, transparent below.
  decoded = records.decode_image(_encode(Image.fromarray(rgba, "RGBA")))
  np.testing.assert_array_equal(decoded[0, 0], [200, 0, 0])
  np.testing.assert_array_equal(decoded[-1, -1], [255, 255, 255])


def test_16_bit_is_scaled_to_8_bits():
  deep = np.full((32, 32), 65535, np.uint16)
  deep[:, :16] = 32768
  decoded = records.decode_image(_encode(Image.fromarray(deep)))
  assert decoded.dtype == np.uint8
  assert decoded[0, -1, 0] == 255
  assert abs(int(decoded[0, 0, 0]) - 128) <= 1


def test_palette_image_becomes_rgb():
  image = Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).convert(
    "P", palette=Image.Palette.ADAPTIVE
  )
  assert records.decode_image(_encode(image))[0, 0].tolist() == [90, 90, 90]


@pytest.mark.parametrize(
  ("data", "reason"),
  [
    (b"not an image at all", "unreadable image"),
    (b"", "unreadable image"),
    (_encode(Image.new("RGB", (64, 64)))[:60], "unreadable image"),  # Truncated PNG.
    (_encode(Image.new("RGB", (8, 40))), "under the 16-pixel minimum"),
    (decompression_bomb_png(), r"over the pixel limit: .*100,000,000 pixels"),
    (decompression_bomb_png(11_000), r"over the pixel limit: 11000x11000 pixels"),
  ],
  ids=["garbage", "empty", "truncated", "tiny", "bomb", "over_limit"],
)
def test_bad_images_are_rejected_with_a_reason(data, reason):
  with pytest.raises(records.BadRecord, match=reason):
    records.decode_image(data)


def test_resize_and_crop():
  image = np.zeros((100, 200, 3), np.uint8)
  image[:, 100:] = 255  # Right half white.
  center = records.resize_and_crop(image, 32)
  assert center.shape == (32, 32, 3)
  assert center[:, 0].max() < 128 and center[:, -1].min() > 128  # The crop straddles the edge.
  crops = {records.resize_and_crop(image, 32, np.random.default_rng(s)).mean() for s in range(8)}
  assert len(crops) > 1  # Random crops move.


@pytest.mark.parametrize(
  ("raw", "clean"),
  [
    ("  a  red\tcircle \n", "a red circle"),
    ("ｆｕｌｌ　width", "full width"),  # NFKC.
    (b"caf\xc3\xa9", "café"),
    (b"bad \xff byte", "bad \ufffd byte"),  # Non-UTF-8: replaced, kept.
  ],
)
def test_captions_are_cleaned(raw, clean):
  assert records.clean_caption(raw) == clean


@pytest.mark.parametrize("raw", ["", "   \n\t", b""])
def test_empty_captions_are_rejected(raw):
  with pytest.raises(records.BadRecord, match="empty caption"):
    records.clean_caption(raw)


def test_skip_counter_names_records():
  counter = records.SkipCounter(examples_per_reason=2)
  for name in ("a.png", "b.png", "c.png"):
    counter.skip(name, "unreadable image: broken")
  counter.skip("d.png", "empty caption")
  counter.skip("a.png", "unreadable image: broken")  # Read again: counted once.
  assert counter.counts() == {"unreadable image": 3, "empty caption": 1}
  assert counter.total == 4
  report = counter.report()
  assert "3 x unreadable image (e.g. a.png, b.png)" in report
  assert "c.png" not in report


def test_image_files_named_by_users_are_read_only_if_regular_and_not_too_big(tmp_path):
  import os

  fifo = tmp_path / "pipe.png"
  os.mkfifo(fifo)  # Opening it to read would block until a writer came.
  with pytest.raises(records.BadRecord, match="not a regular file"):
    records.read_image_file(fifo)
  with pytest.raises(records.BadRecord, match="not a regular file"):
    records.read_image_file(pathlib.Path("/dev/zero"))
  with pytest.raises(records.BadRecord, match="no such file"):
    records.read_image_file(tmp_path / "gone.png")
  (tmp_path / "big.png").write_bytes(b"x" * 101)
  with pytest.raises(records.BadRecord, match="over the 100-byte limit"):
    records.read_image_file(tmp_path / "big.png", max_bytes=100)
  assert records.read_image_file(tmp_path / "big.png", max_bytes=101) == b"x" * 101
