"""A contact sheet of images with their captions: a dataset, or samples, at a glance.

Used by the shapes preview and by the sample images of training and inference;
it needs only numpy and Pillow.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


def contact_sheet(
  images: Sequence[np.ndarray], captions: Sequence[str], columns: int = 4, cell: int = 192
) -> bytes:
  """A PNG grid of `images` (uint8 [S, S, 3]), each scaled to `cell` pixels with its caption below."""
  if len(images) != len(captions) or not images:
    raise ValueError("Give one caption per image, and at least one image.")
  rows = -(-len(images) // columns)
  text_height = 44
  sheet = Image.new("RGB", (columns * cell, rows * (cell + text_height)), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  for index, (image, caption) in enumerate(zip(images, captions, strict=True)):
    row, col = divmod(index, columns)
    x, y = col * cell, row * (cell + text_height)
    tile = Image.fromarray(np.asarray(image, np.uint8)).resize(
      (cell, cell), Image.Resampling.NEAREST
    )
    sheet.paste(tile, (x, y))
    lines = textwrap.wrap(caption, width=cell // 6)[:3]
    draw.multiline_text((x + 3, y + cell + 2), "\n".join(lines), fill=(0, 0, 0), spacing=1)
  buffer = io.BytesIO()
  sheet.save(buffer, format="PNG")
  return buffer.getvalue()
