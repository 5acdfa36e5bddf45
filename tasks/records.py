"""Bad input, handled: image decoding and caption cleanup that fix up or reject each record.

A long job must neither crash on one bad record nor silently train on a wrong
one. Every function here either returns a usable value or raises `BadRecord`
with the reason; the input pipeline skips such records, logs them by name and
counts them in a `SkipCounter`, which jobs report when they finish.

  empty caption            skipped ("empty caption")
  non-UTF-8 caption        decoded with U+FFFD for the bad bytes (logged), kept
  caption over the length  kept; tokenization truncates it to the feature length
  corrupt image bytes      skipped ("unreadable image: ...")
  grayscale / palette      converted to RGB
  RGBA / LA                composited over white (transparent pixels turn white)
  16-bit or 32-bit image   scaled to 8 bits per channel
  tiny image               skipped when its short side is under `min_side`
  EXIF rotation            applied

Nothing here needs TensorFlow.
"""

from __future__ import annotations

import collections
import io
import pathlib
import re
import threading
import unicodedata
import warnings

import numpy as np
from absl import logging
from PIL import Image, ImageOps

_WHITESPACE = re.compile(r"\s+")
# The largest image decoded, in pixels (10,000 x 10,000): a bigger one (a
# decompression bomb, say: a 20000 x 20000 PNG can be 50 KB) is a bad record, skipped
# and named, rather than a job that takes the host's memory or dies. PIL refuses
# beyond twice its own limit with an error of its own, also turned into a bad record.
MAX_PIXELS = 100_000_000


# The most bytes read from one image file named by a request (256 MiB): a device such
# as /dev/zero must not be read without end.
MAX_IMAGE_FILE_BYTES = 256 * 2**20


class BadRecord(ValueError):
  """A record that cannot be used; the message says why."""


def clean_caption(caption: bytes | str, name: str = "") -> str:
  """NFKC-normalized caption with runs of whitespace collapsed to one space.

  Raises:
    BadRecord: the caption is empty once cleaned.
  """
  if isinstance(caption, bytes):
    try:
      caption = caption.decode("utf-8")
    except UnicodeDecodeError:
      caption = caption.decode("utf-8", errors="replace")
      logging.warning("Record %s: caption is not valid UTF-8; bad bytes replaced.", name)
  caption = _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", caption)).strip()
  if not caption:
    raise BadRecord("empty caption")
  return caption


def read_image_file(path: pathlib.Path, max_bytes: int = MAX_IMAGE_FILE_BYTES) -> bytes:
  """The bytes of an image file named by a user, read safely.

  Raises:
    BadRecord: not a regular file (a FIFO would block forever, a device never end),
      or larger than `max_bytes`.
  """
  if not path.is_file():
    raise BadRecord("not a regular file" if path.exists() else "no such file")
  with open(path, "rb") as handle:
    data = handle.read(max_bytes + 1)
  if len(data) > max_bytes:
    raise BadRecord(f"over the {max_bytes:,}-byte limit (parti.tasks.records.MAX_IMAGE_FILE_BYTES)")
  return data


def decode_image(data: bytes, min_side: int = 16) -> np.ndarray:
  """Decodes image bytes of any common format to uint8 RGB [height, width, 3].

  Raises:
    BadRecord: unreadable bytes, or an image whose short side is under `min_side`.
  """
  try:
    with warnings.catch_warnings():
      # Our own limit decides (below); PIL's warning threshold is another number.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
      if image.width * image.height > MAX_PIXELS:
        raise BadRecord(_too_large(image.width, image.height))
      image.load()
      image = ImageOps.exif_transpose(image)
  except BadRecord:
    raise
  except Image.DecompressionBombError as error:  # Over twice PIL's own limit.
    raise BadRecord(_too_large(detail=str(error))) from None
  except (OSError, SyntaxError, ValueError) as error:
    raise BadRecord(f"unreadable image: {error}") from None
  if min(image.size) < min_side:
    raise BadRecord(f"image is {image.width}x{image.height}, under the {min_side}-pixel minimum")
  return to_rgb8(image)


def _too_large(width: int = 0, height: int = 0, detail: str = "") -> str:
  """The reason (one kind for the skip counter, before the colon) for a too-large image."""
  size = f"{width}x{height} pixels" if width else detail
  return (
    f"image over the pixel limit: {size}; the limit is {MAX_PIXELS:,} pixels "
    "(parti.tasks.records.MAX_PIXELS)"
  )


def to_rgb8(image: Image.Image) -> np.ndarray:
  """Any PIL image as uint8 RGB: deep images scaled, alpha composited over white."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    array = np.asarray(image, np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
    if image.mode == "F":
      top = max(1.0, float(array.max()))
    gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if image.mode == "P":
    image = image.convert("RGBA")
  if image.mode in ("RGBA", "LA", "PA"):
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, image.convert("RGBA"))
  return np.asarray(image.convert("RGB"), np.uint8)


def resize_and_crop(
  image: np.ndarray, size: int, rng: np.random.Generator | None = None
) -> np.ndarray:
  """Resizes the shorter side to `size` (antialiased), then crops a square.

  The crop is centered, or placed at random when `rng` is given (training).
  """
  height, width = image.shape[:2]
  scale = size / min(height, width)
  new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
  if (new_h, new_w) != (height, width):
    resized = Image.fromarray(image).resize(
      (new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0
    )
    image = np.asarray(resized)
  if rng is None:
    top, left = (new_h - size) // 2, (new_w - size) // 2
  else:
    top, left = int(rng.integers(new_h - size + 1)), int(rng.integers(new_w - size + 1))
  return image[top : top + size, left : left + size]


class SkipCounter:
  """Counts skipped records by reason and remembers the first few names of each.

  A record is counted once per reason however often it is read: a job that reads a
  source again (the encode job re-reads it for each shard) must not count its bad
  records again. Thread-safe: tf.data calls the decoders from several threads.
  """

  def __init__(self, examples_per_reason: int = 5):
    self._lock = threading.Lock()
    self._seen: set[tuple[str, str]] = set()
    self._counts: collections.Counter[str] = collections.Counter()
    self._examples: dict[str, list[str]] = collections.defaultdict(list)
    self._keep = examples_per_reason

  def skip(self, name: str, reason: str) -> None:
    """Records that record `name` was skipped, and logs the first few of each reason."""
    kind = reason.split(":")[0]
    with self._lock:
      if (kind, name) in self._seen:
        return
      self._seen.add((kind, name))
      self._counts[kind] += 1
      count = self._counts[kind]
      if len(self._examples[kind]) < self._keep:
        self._examples[kind].append(name)
    if count <= self._keep or count % 1000 == 0:
      logging.warning("Skipping record %s: %s (%d skipped for this reason).", name, reason, count)

  @property
  def total(self) -> int:
    with self._lock:
      return sum(self._counts.values())

  def counts(self) -> dict[str, int]:
    with self._lock:
      return dict(self._counts)

  def report(self) -> str:
    """One line per reason: the count and the first records skipped."""
    with self._lock:
      if not self._counts:
        return "No records skipped."
      lines = [f"Skipped {sum(self._counts.values())} records:"]
      for kind, count in self._counts.most_common():
        lines.append(f"  {count} x {kind} (e.g. {', '.join(self._examples[kind])})")
      return "\n".join(lines)


# The process-wide counter the input pipeline reports to.
SKIPPED = SkipCounter()
