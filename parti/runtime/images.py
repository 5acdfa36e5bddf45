"""Float images to pixels and PNG bytes, written once for every job that saves images."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """Images in [0, 1] (any float array) -> uint8 pixels, rounded, out-of-range clipped."""
  return (np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def png_bytes(image) -> bytes:
  """One image [H, W, 3] in [0, 1] as PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(to_uint8(image)).save(buffer, format="PNG")
  return buffer.getvalue()
