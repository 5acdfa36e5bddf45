"""LPIPS-style perceptual distance on VGG16 features, with weights loaded from a file.

Pretrained weights cannot be downloaded at run time, so the loss reads a file you
supply. **Format**: an `.npz` of the torchvision VGG16 state dict, keys as
torchvision names them (`features.0.weight` [64, 3, 3, 3] OIHW, `features.0.bias`
[64], ... `features.28.*`; `classifier.*` keys are ignored). Export it once with

    import numpy as np, torchvision
    sd = torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict()
    np.savez("vgg16.npz", **{k: v.numpy() for k, v in sd.items()})

Optionally the same file may hold LPIPS's learned per-channel weights as
`lin.0` .. `lin.4` (shape [C] or LPIPS's [1, C, 1, 1]); without them every channel
weighs the same. The distance: unit-normalize each layer's features over channels,
square the difference, weight channels, average over space, sum over layers.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

# torchvision's features.N index of each conv, in order; "M" marks a 2x2 max-pool.
_LAYOUT = (0, 2, "M", 5, 7, "M", 10, 12, 14, "M", 17, 19, 21, "M", 24, 26, 28)
_CHANNELS = {0: 64, 2: 64, 5: 128, 7: 128, 10: 256, 12: 256, 14: 256, 17: 512, 19: 512, 21: 512,
             24: 512, 26: 512, 28: 512}  # fmt: skip
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the outputs of these convs.
_TAPS = (2, 7, 14, 21, 28)
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Every key the loader needs, with its torchvision shape."""
  shapes, previous = {}, 3
  for index in (i for i in _LAYOUT if i != "M"):
    out = _CHANNELS[index]
    shapes[f"features.{index}.weight"] = (out, previous, 3, 3)
    shapes[f"features.{index}.bias"] = (out,)
    previous = out
  return shapes


def load_vgg16(path: str | pathlib.Path) -> dict[str, jax.Array]:
  """Reads VGG16 conv weights (and optional LPIPS channel weights) from an .npz.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: a key is missing or has the wrong shape.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
      f"VGG16 weights file {path} not found. Export torchvision's VGG16 state dict to .npz "
      "(see parti/tokenizer/vgg.py), or leave the perceptual loss off."
    )
  with np.load(path) as data:
    weights = {}
    for key, shape in expected_shapes().items():
      if key not in data:
        raise ValueError(f"{path} has no {key!r}; is it a torchvision VGG16 state dict?")
      if data[key].shape != shape:
        raise ValueError(f"{path}: {key} has shape {data[key].shape}, expected {shape}.")
      array = data[key].astype(np.float32)
      weights[key] = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array  # OIHW -> HWIO
    for i, tap in enumerate(_TAPS):
      if f"lin.{i}" in data:
        weights[f"lin.{i}"] = data[f"lin.{i}"].astype(np.float32).reshape(_CHANNELS[tap])
  return {k: jnp.asarray(v) for k, v in weights.items()}


def features(weights: dict[str, jax.Array], images: jax.Array) -> list[jax.Array]:
  """The five LPIPS taps of VGG16 for images [B, H, W, 3] in [0, 1]."""
  x = (images.astype(jnp.float32) - _MEAN) / _STD
  taps = []
  for item in _LAYOUT:
    if item == "M":
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
      continue
    kernel, bias = weights[f"features.{item}.weight"], weights[f"features.{item}.bias"]
    x = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    x = jax.nn.relu(x + bias)
    if item in _TAPS:
      taps.append(x)
  return taps


def perceptual_distance(weights: dict[str, jax.Array], a: jax.Array, b: jax.Array) -> jax.Array:
  """LPIPS-style distance between image batches, averaged over the batch."""
  total = 0.0
  for i, (fa, fb) in enumerate(zip(features(weights, a), features(weights, b), strict=True)):
    fa = fa * jax.lax.rsqrt(jnp.sum(fa**2, -1, keepdims=True) + 1e-10)
    fb = fb * jax.lax.rsqrt(jnp.sum(fb**2, -1, keepdims=True) + 1e-10)
    squared = (fa - fb) ** 2
    channel_weights = weights.get(f"lin.{i}")
    per_pixel = squared @ channel_weights if channel_weights is not None else jnp.sum(squared, -1)
    total = total + jnp.mean(per_pixel)
  return total
