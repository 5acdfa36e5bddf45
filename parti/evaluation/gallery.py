"""An HTML gallery of generated images with their prompts: one self-contained page, offline.

The page links images by relative path, so the output folder can be copied or
opened straight from disk; prompts are HTML-escaped.
"""

from __future__ import annotations

import html
import pathlib
from collections.abc import Mapping, Sequence

from parti.runtime import files

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 14px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.card img { width: 100%; image-rendering: pixelated; display: block; margin-bottom: 4px; }
.card img.given { outline: 2px dashed #888; }
.card img.small { width: 25%; align-self: flex-start; }
.row { display: flex; gap: 4px; }
.prompt { font-size: 0.9em; margin: 6px 0 2px; }
.meta { font-size: 0.75em; color: #777; }
"""


def write_gallery(
  path: str | pathlib.Path, title: str, entries: Sequence[Mapping], subtitle: str = ""
) -> pathlib.Path:
  """Writes the page: one card per manifest entry (prompt, files, category, challenge, scores)."""
  cards = []
  for entry in entries:
    # For image completion, the given image's kept rows come first, outlined. With an
    # upsampler, each large image shows, its tokenizer-size original small beside it.
    prefix = entry.get("prefix_file")
    shown = [(prefix, ' class="given" title="the given rows"')] if prefix else []
    # An edit shows its input, the tokens redrawn and the input's own decoding first.
    edit = entry.get("edit") or {}
    for key, title in (("input_file", "the input"), ("mask_file", "redrawn (white)"),
                       ("decoded_input_file", "the input, decoded from its codes")):  # fmt: skip
      if edit.get(key):
        shown.append((edit[key], f' class="given" title="{title}"'))
    large = entry.get("upsampled_files") or []
    for rank, name in enumerate(entry["files"]):
      if rank < len(large):
        shown.append((large[rank], f' title="upsampled {entry.get("upsampler_scale", "")}x"'))
        shown.append((name, ' class="small" title="the tokenizer\'s size"'))
      else:
        shown.append((name, ""))
    images = "".join(
      f'<img src="{html.escape(name)}" alt="{html.escape(entry["prompt"])}" loading="lazy"'
      f"{attributes}>"
      for name, attributes in shown
    )
    meta = " · ".join(
      html.escape(str(value)) for value in (entry.get("category"), entry.get("challenge")) if value
    )
    scores = entry.get("scores") or []
    if scores:
      meta += (" · " if meta else "") + "score " + ", ".join(f"{s:.1f}" for s in scores)
    cards.append(
      f'<div class="card"><div class="row">{images}</div>'
      f'<div class="prompt">{html.escape(entry["prompt"])}</div>'
      f'<div class="meta">{meta}</div></div>'
    )
  page = (
    "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
    f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
    f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(subtitle)}</p>"
    f"<div class='grid'>{''.join(cards)}</div></body></html>\n"
  )
  return files.atomic_write_text(path, page)
