"""Editing: inpainting, outpainting and text-guided region edits, zero-shot with the
text-to-image model as trained, or through the fine-tuned editing head.

A request names an image, the region to redraw, and the prompt of the finished image:

    {"prompt": "a blue circle", "image": "scene.png", "mask": "mask.png"}   # white: redraw
    {"prompt": "a blue circle", "image": "scene.png", "box": [0, 0, 16, 16]} # x0, y0, x1, y1
    {"prompt": "a blue circle", "image": "crop.png", "extend": [0, 16, 0, 0]} # outpaint:
                                                    # pixels added top, right, bottom, left

The image (extended by the new area for outpainting) is resized and center-cropped to
the tokenizer's size, and so is its mask. A token is redrawn when any of its pixels is
masked; every other token stays the image's own, exactly. Decoding runs in raster
order with those tokens fed as given (`decoding.sample(keep=...)`), so the masked ones
are drawn given everything before them; the candidates (`SamplingOptions.samples`) are
then ranked by the log-likelihood of the whole sequence, which includes the kept
tokens after the masked region: a filling that makes what follows it unlikely loses.
That is the zero-shot way an autoregressive model can see the suffix it cannot attend
to. With one sample, the suffix is ignored: the naive baseline. A model fine-tuned for
editing (`PartiConfig.edit_context`, `edit_method`) also reads the whole image, the
redrawn tokens masked, in its encoder (`decoding.sample(edit_context=...)`).

Every request is read and checked before anything is generated; a bad one (unreadable
image or mask, a mask of another size, a box outside the image, a region that is empty
or covers the whole image) is refused by name.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from parti.modeling.model import Parti
from parti.runtime.errors import ConfigError
from parti.sampling import decoding

# How an edit is made: "auto" is fine-tuned when the model has the editing head.
METHODS = ("auto", "zero_shot", "fine_tuned")

# The canvas's value where outpainting adds pixels (redrawn anyway; mid-gray decodes
# to the most neutral codes).
_NEW_AREA = 128


@dataclasses.dataclass(frozen=True)
class Edit:
  """One request's prepared edit at the tokenizer's size.

  Attributes:
    image: uint8 [S, S, 3], the image (or extended canvas) as the tokenizer reads it.
    pixel_mask: bool [S, S], the pixels to redraw.
    tokens: int32 [N], the image's codes.
    redraw: bool [N], the tokens to redraw (any of their pixels masked).
  """

  image: np.ndarray
  pixel_mask: np.ndarray
  tokens: np.ndarray
  redraw: np.ndarray

  @property
  def token_mask_image(self) -> np.ndarray:
    """bool [S, S]: the pixels of the redrawn tokens (what the edit may change)."""
    side = self.image.shape[0]
    grid = math.isqrt(len(self.redraw))
    cells = self.redraw.reshape(grid, grid)
    return cells.repeat(side // grid, axis=0).repeat(side // grid, axis=1)


def is_edit(prompt) -> bool:
  """Whether a request asks for an edit (it names a region), not a completion."""
  return bool(prompt.mask or prompt.box or prompt.extend)


def fine_tuned(method: str, config) -> bool:
  """Whether edits go through the editing head (`PartiConfig.edit_context`)."""
  return method == "fine_tuned" or (method == "auto" and config.edit_context)


def check_method(method: str, config, prompts, model_dir: str = "the model") -> None:
  """Refuses, naming the first edit request, fine-tuned edits of a model without the
  editing head; before anything is generated.

  Raises:
    ConfigError: `method` is "fine_tuned", a request is an edit, and the model has no head.
  """
  if method != "fine_tuned" or config.edit_context:
    return
  for prompt in prompts:
    if is_edit(prompt):
      raise ConfigError(
        f"{prompt.source}: a fine-tuned edit was asked for (edit_method='fine_tuned'), but "
        f"{model_dir} has no editing head (PartiConfig.edit_context): fine-tune one from "
        "it with gin/editing/finetune_shapes.gin, or edit zero-shot (edit_method="
        "'zero_shot' or 'auto')."
      )


def region(prompt, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(the image, extended for outpainting; its bool mask of pixels to redraw), at the
  image's own size.

  Raises:
    ConfigError: the mask is unreadable or of another size, the box lies outside the
      image, or the extension is negative.
  """
  from parti.tasks import records

  height, width = image.shape[:2]
  where = prompt.source
  kinds = [name for name in ("mask", "box", "extend") if getattr(prompt, name)]
  if len(kinds) > 1:
    raise ConfigError(f"{where}: give one of mask, box and extend, not {kinds}.")
  if prompt.mask:
    try:
      mask = records.decode_image(records.read_image_file(pathlib.Path(prompt.mask)), min_side=1)
    except (OSError, records.BadRecord) as error:
      raise ConfigError(f"{where}: mask {prompt.mask} cannot be read: {error}") from error
    if mask.shape[:2] != (height, width):
      raise ConfigError(
        f"{where}: mask {prompt.mask} is {mask.shape[1]}x{mask.shape[0]}, its image "
        f"{prompt.image} {width}x{height}: a mask must be its image's size."
      )
    return image, mask.mean(axis=-1) >= 128
  if prompt.box:
    x0, y0, x1, y1 = prompt.box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
      raise ConfigError(
        f"{where}: box {list(prompt.box)} is not a box inside the {width}x{height} image "
        "(x0, y0, x1, y1 in pixels, x0 < x1 <= width, y0 < y1 <= height)."
      )
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return image, mask
  top, right, bottom, left = prompt.extend
  if min(prompt.extend) < 0 or max(prompt.extend) == 0:
    raise ConfigError(
      f"{where}: extend {list(prompt.extend)} must add pixels (top, right, bottom, left; none "
      "negative, one at least positive)."
    )
  canvas = np.full((top + height + bottom, left + width + right, 3), _NEW_AREA, np.uint8)
  canvas[top : top + height, left : left + width] = image
  mask = np.ones(canvas.shape[:2], bool)
  mask[top : top + height, left : left + width] = False
  return canvas, mask


def prepare(prompt, tok_config, encode) -> Edit:
  """Reads, extends, resizes and encodes one request's image and mask.

  Args:
    prompt: an edit request (`is_edit`).
    tok_config: the tokenizer's config (its image size and grid).
    encode: images uint8 [B, S, S, 3] -> codes [B, h, w] (the tokenizer's `encode`).

  Raises:
    ConfigError: anything `region` refuses, an unreadable image, or a region that
      leaves no token to redraw or none to keep.
  """
  from parti.tasks import records

  where = prompt.source
  try:
    image = records.decode_image(records.read_image_file(pathlib.Path(prompt.image)))
  except (OSError, records.BadRecord) as error:
    raise ConfigError(f"{where}: image {prompt.image} cannot be read: {error}") from error
  canvas, mask = region(prompt, image)
  side = tok_config.image_size
  image = records.resize_and_crop(canvas, side)
  # The mask goes through the same resize and crop, as an image.
  as_image = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=-1)
  pixel_mask = records.resize_and_crop(as_image, side)[..., 0] >= 128
  rows, cols = tok_config.patch_grid
  patch = tok_config.patch_size
  redraw = pixel_mask.reshape(rows, patch, cols, patch).any(axis=(1, 3))
  # A patch's sub-codes (codebook_groups of them) are redrawn together.
  redraw = tok_config.token_mask(redraw)
  if not redraw.any():
    raise ConfigError(f"{where}: the region to redraw is empty at the tokenizer's {side} px.")
  if redraw.all():
    raise ConfigError(
      f"{where}: the region to redraw covers the whole image, so nothing of it would be "
      "kept: send the prompt alone to generate a new image."
    )
  tokens = np.asarray(encode(image[None]))[0].reshape(-1).astype(np.int32)
  return Edit(image, pixel_mask, tokens, redraw)


def teacher_forced_logits(
  config, params, text, tokens, guidance_scale=1.0, repeat: int = 1, context=None
):
  """[B * repeat, N, V] guided logits of each position given the text (and image
  `context` [B, N], with the editing head) and the tokens before it, in one
  teacher-forced pass (no cache). `text` is [B, T] and `tokens` [B * repeat, N]: each
  text scores `repeat` consecutive token rows, and is encoded once. Jittable."""
  params, config = decoding.unstack_layers(params, config)
  model = Parti(config)
  rows = tokens.shape[0]
  text_guidance = decoding.Guidance(guidance_scale, text.shape[0])
  encoded, mask = decoding.encode(model, params, text_guidance, text, context)
  if repeat > 1:  # Each half (conditional, null) of the doubled batch, repeated in place.
    encoded, mask = (jnp.repeat(x, repeat, axis=0) for x in (encoded, mask))
  scale = jnp.repeat(jnp.broadcast_to(jnp.asarray(guidance_scale), (text.shape[0],)), repeat)
  guidance = decoding.Guidance(guidance_scale if not text_guidance.on else scale, rows)
  bos = jnp.full((rows, 1), config.bos_id, jnp.int32)
  inputs = jnp.concatenate([bos, tokens[:, :-1]], axis=1)
  logits = model.apply(
    {"params": params}, guidance.doubled(inputs), encoded, mask, method=Parti.decode
  )
  return guidance.guide(logits)


def sequence_log_likelihood(
  config, params, text, tokens, guidance_scale=1.0, repeat: int = 1, context=None
):
  """[B * repeat] log-likelihood of each whole token sequence under the guided model (see
  `teacher_forced_logits` for `repeat` and `context`)."""
  logits = teacher_forced_logits(config, params, text, tokens, guidance_scale, repeat, context)
  return decoding.log_prob(logits, tokens).sum(-1)


def refine(
  config, params, text, tokens, redraw, *, guidance_scale=1.0, top_k=64, sweeps=1, context=None
):
  """Iterated conditional modes over the redrawn tokens: at each redrawn position in
  raster order (`sweeps` times), the token becomes the one, of the `top_k` codes likeliest
  there given the tokens before it, that makes the whole sequence likeliest given
  everything else, the kept tokens after it included. For a single redrawn token one
  sweep is the exact best filling within those codes, where sampled candidates find it
  only by chance. Positions with nothing to redraw are skipped. Jittable.

  Args:
    config: the model.
    params: its parameters.
    text: [B, T] text tokens.
    tokens: [B, N] a filling to start from (the best sample, say).
    redraw: [B, N] bool, the tokens that may change.
    guidance_scale: classifier-free guidance, as the candidates were sampled with.
    top_k: codes tried at each position (0: all).
    sweeps: passes over the redrawn positions.
    context: [B, N] the image context, with the editing head (see `decoding.sample`).

  Returns:
    ([B, N] tokens, [B] their whole-sequence log-likelihood).
  """
  batch, length = tokens.shape
  k = min(top_k or config.image_vocab_size, config.image_vocab_size)
  redraw = jnp.asarray(redraw, bool)

  def visit(position, tokens):
    def improve(tokens):
      logits = teacher_forced_logits(config, params, text, tokens, guidance_scale, context=context)
      codes = jax.lax.top_k(jnp.take(logits, position, axis=1), k)[1]  # [B, k]
      here = jnp.arange(length) == position
      candidates = jnp.where(here, codes[..., None], tokens[:, None, :]).reshape(-1, length)
      scores = sequence_log_likelihood(config, params, text, candidates, guidance_scale, k, context)
      best = jnp.take_along_axis(codes, scores.reshape(batch, k).argmax(-1)[:, None], 1)
      return jnp.where(here & redraw, best, tokens)

    return jax.lax.cond(redraw[:, position].any(), improve, lambda t: t, tokens)

  tokens = jnp.asarray(tokens, jnp.int32)
  for _ in range(sweeps):
    tokens = jax.lax.fori_loop(0, length, visit, tokens)
  return tokens, sequence_log_likelihood(
    config, params, text, tokens, guidance_scale, context=context
  )
