"""Inception-v3 pool features for FID, with weights read from a file you supply.

    weights = load_inception("pt_inception_fid.npz")
    features = pool_features(weights, images)     # images [N, H, W, 3] in [0, 1] -> [N, 2048]

FID is defined by one network: the TensorFlow Inception-v3 of Heusel et al.
(2017), whose pytorch-fid port (`FIDInceptionA/C/E_1/E_2`) reproduces its
features. No weights can be downloaded here, so the network reads a file.
**Format**: an `.npz` of that port's PyTorch state dict, keys as it names them
(`Conv2d_1a_3x3.conv.weight` [32, 3, 3, 3] OIHW, `Conv2d_1a_3x3.bn.running_mean`,
... `Mixed_7c.branch_pool.bn.bias`; `fc.*` keys are ignored). Export it once with

    import numpy as np
    from pytorch_fid.inception import fid_inception_v3
    sd = fid_inception_v3().state_dict()
    np.savez("pt_inception_fid.npz", **{k: v.numpy() for k, v in sd.items()})

The forward pass follows pytorch-fid: bilinear resize to 299x299, scale to
[-1, 1], the stem and the eleven Inception blocks (average pools that exclude
the padding, and a max pool in the last block's pool branch, as in the TF
graph), then the global average pool. Written with `lax` convolutions rather
than as a Flax module so that the state dict's names are the parameter names
and no conversion step can drift.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

FEATURE_DIM = 2048
INPUT_SIZE = 299
_BN_EPS = 1e-3


# The network: each BasicConv2d (conv without bias, batch norm, ReLU) as
# (pytorch-fid's name, in, out, kernel (h, w), stride, padding (h, w)).
def _conv_spec(name, cin, cout, kernel, stride=1, padding=(0, 0)):
  return (name, cin, cout, kernel, stride, padding)


_STEM = (
  _conv_spec("Conv2d_1a_3x3", 3, 32, (3, 3), 2),
  _conv_spec("Conv2d_2a_3x3", 32, 32, (3, 3)),
  _conv_spec("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
  "max_pool",
  _conv_spec("Conv2d_3b_1x1", 64, 80, (1, 1)),
  _conv_spec("Conv2d_4a_3x3", 80, 192, (3, 3)),
  "max_pool",
)


def _a(cin: int, pool: int) -> dict:
  return {
    "branch1x1": [_conv_spec("branch1x1", cin, 64, (1, 1))],
    "branch5x5": [
      _conv_spec("branch5x5_1", cin, 48, (1, 1)),
      _conv_spec("branch5x5_2", 48, 64, (5, 5), 1, (2, 2)),
    ],
    "branch3x3dbl": [
      _conv_spec("branch3x3dbl_1", cin, 64, (1, 1)),
      _conv_spec("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
      _conv_spec("branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1)),
    ],
    "branch_pool": [_conv_spec("branch_pool", cin, pool, (1, 1))],
  }


_B = {
  "branch3x3": [_conv_spec("branch3x3", 288, 384, (3, 3), 2)],
  "branch3x3dbl": [
    _conv_spec("branch3x3dbl_1", 288, 64, (1, 1)),
    _conv_spec("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
    _conv_spec("branch3x3dbl_3", 96, 96, (3, 3), 2),
  ],
}


def _c(c7: int) -> dict:
  return {
    "branch1x1": [_conv_spec("branch1x1", 768, 192, (1, 1))],
    "branch7x7": [
      _conv_spec("branch7x7_1", 768, c7, (1, 1)),
      _conv_spec("branch7x7_2", c7, c7, (1, 7), 1, (0, 3)),
      _conv_spec("branch7x7_3", c7, 192, (7, 1), 1, (3, 0)),
    ],
    "branch7x7dbl": [
      _conv_spec("branch7x7dbl_1", 768, c7, (1, 1)),
      _conv_spec("branch7x7dbl_2", c7, c7, (7, 1), 1, (3, 0)),
      _conv_spec("branch7x7dbl_3", c7, c7, (1, 7), 1, (0, 3)),
      _conv_spec("branch7x7dbl_4", c7, c7, (7, 1), 1, (3, 0)),
      _conv_spec("branch7x7dbl_5", c7, 192, (1, 7), 1, (0, 3)),
    ],
    "branch_pool": [_conv_spec("branch_pool", 768, 192, (1, 1))],
  }


_D = {
  "branch3x3": [
    _conv_spec("branch3x3_1", 768, 192, (1, 1)),
    _conv_spec("branch3x3_2", 192, 320, (3, 3), 2),
  ],
  "branch7x7x3": [
    _conv_spec("branch7x7x3_1", 768, 192, (1, 1)),
    _conv_spec("branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
    _conv_spec("branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
    _conv_spec("branch7x7x3_4", 192, 192, (3, 3), 2),
  ],
}


def _e(cin: int) -> dict:
  return {
    "branch1x1": [_conv_spec("branch1x1", cin, 320, (1, 1))],
    "branch3x3": [_conv_spec("branch3x3_1", cin, 384, (1, 1))],
    "branch3x3_2a": [_conv_spec("branch3x3_2a", 384, 384, (1, 3), 1, (0, 1))],
    "branch3x3_2b": [_conv_spec("branch3x3_2b", 384, 384, (3, 1), 1, (1, 0))],
    "branch3x3dbl": [
      _conv_spec("branch3x3dbl_1", cin, 448, (1, 1)),
      _conv_spec("branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1)),
    ],
    "branch3x3dbl_3a": [_conv_spec("branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1))],
    "branch3x3dbl_3b": [_conv_spec("branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0))],
    "branch_pool": [_conv_spec("branch_pool", cin, 192, (1, 1))],
  }


_BLOCKS = (
  ("Mixed_5b", "A", _a(192, 32)),
  ("Mixed_5c", "A", _a(256, 64)),
  ("Mixed_5d", "A", _a(288, 64)),
  ("Mixed_6a", "B", _B),
  ("Mixed_6b", "C", _c(128)),
  ("Mixed_6c", "C", _c(160)),
  ("Mixed_6d", "C", _c(160)),
  ("Mixed_6e", "C", _c(192)),
  ("Mixed_7a", "D", _D),
  ("Mixed_7b", "E_1", _e(1280)),
  ("Mixed_7c", "E_2", _e(2048)),
)


def _convs() -> Iterator[tuple]:
  """(full name, in, out, kernel, stride, padding) for every BasicConv2d, in order."""
  for layer in _STEM:
    if layer != "max_pool":
      yield layer
  for block, _, branches in _BLOCKS:
    for convs in branches.values():
      for name, *spec in convs:
        yield (f"{block}.{name}", *spec)


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Every key the loader needs, with its PyTorch shape."""
  shapes = {}
  for name, cin, cout, (kh, kw), _, _ in _convs():
    shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
    for stat in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.bn.{stat}"] = (cout,)
  return shapes


def load_inception(path: str | pathlib.Path) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Reads the weights and folds each batch norm into its conv: name -> (HWIO kernel, bias).

  Raises:
    FileNotFoundError: no file at `path`, with how to make one.
    ValueError: the file is not an .npz, or a key is missing or has the wrong shape.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
      f"Inception-v3 weights file {path} not found. FID needs the pytorch-fid Inception "
      "weights exported to .npz (see parti/evaluation/inception.py); none can be downloaded here."
    )
  try:
    data = np.load(path)
  except (OSError, ValueError) as error:
    raise ValueError(f"{path} is not a readable .npz of Inception weights: {error}") from error
  with data:
    expected = expected_shapes()
    missing = sorted(set(expected) - set(data.files))
    if missing:
      raise ValueError(
        f"{path} lacks {len(missing)} Inception-v3 keys, e.g. {missing[:3]}; export "
        "pytorch-fid's fid_inception_v3() state dict (see parti/evaluation/inception.py)."
      )
    for key, shape in expected.items():
      if tuple(data[key].shape) != shape:
        raise ValueError(f"{path}: {key} has shape {data[key].shape}, expected {shape}.")
    weights = {}
    for name, *_ in _convs():
      kernel = data[f"{name}.conv.weight"].astype(np.float32)
      gamma, beta, mean, var = (
        data[f"{name}.bn.{s}"].astype(np.float32)
        for s in ("weight", "bias", "running_mean", "running_var")
      )
      scale = gamma / np.sqrt(var + _BN_EPS)
      folded = (kernel * scale[:, None, None, None]).transpose(2, 3, 1, 0)  # OIHW -> HWIO
      weights[name] = (jnp.asarray(folded), jnp.asarray(beta - mean * scale))
  return weights


def _conv(weights, name, x, stride, padding):
  kernel, bias = weights[name]
  y = jax.lax.conv_general_dilated(
    x,
    kernel,
    (stride, stride),
    [(padding[0], padding[0]), (padding[1], padding[1])],
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  return jax.nn.relu(y + bias)


def max_pool(x: jax.Array, size: int = 3, stride: int = 2, padding: int = 0) -> jax.Array:
  pad = [(0, 0), (padding, padding), (padding, padding), (0, 0)]
  return jax.lax.reduce_window(
    x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), pad
  )


def average_pool_excluding_padding(x: jax.Array) -> jax.Array:
  """3x3, stride 1, padding 1, dividing by the in-image count (count_include_pad=False)."""
  pad = [(0, 0), (1, 1), (1, 1), (0, 0)]
  sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
  counts = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  return sums / counts


def _block(weights, block, kind, branches, x):
  def run(branch, inputs):
    for name, _, _, _, stride, padding in branches[branch]:
      inputs = _conv(weights, f"{block}.{name}", inputs, stride, padding)
    return inputs

  if kind in ("A", "C"):
    pooled = average_pool_excluding_padding(x)
    outs = [run(b, x) for b in branches if b != "branch_pool"]
    return jnp.concatenate([*outs, run("branch_pool", pooled)], axis=-1)
  if kind in ("B", "D"):
    outs = [run(b, x) for b in branches]
    return jnp.concatenate([*outs, max_pool(x)], axis=-1)
  # E: the 3x3 branches split into (1, 3) and (3, 1) halves.
  b1 = run("branch1x1", x)
  b3 = run("branch3x3", x)
  b3 = jnp.concatenate([run("branch3x3_2a", b3), run("branch3x3_2b", b3)], axis=-1)
  bd = run("branch3x3dbl", x)
  bd = jnp.concatenate([run("branch3x3dbl_3a", bd), run("branch3x3dbl_3b", bd)], axis=-1)
  # The TF graph's last block max-pools here (pytorch-fid's FIDInceptionE_2).
  pooled = max_pool(x, 3, 1, 1) if kind == "E_2" else average_pool_excluding_padding(x)
  return jnp.concatenate([b1, b3, bd, run("branch_pool", pooled)], axis=-1)


@jax.jit
def pool_features(weights, images: jax.Array) -> jax.Array:
  """[N, H, W, 3] in [0, 1] -> the [N, 2048] pool3 features FID compares."""
  x = jnp.asarray(images, jnp.float32)
  x = jax.image.resize(
    x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False
  )  # pytorch-fid: F.interpolate(bilinear, align_corners=False).
  x = 2.0 * x - 1.0
  for layer in _STEM:
    x = max_pool(x) if layer == "max_pool" else _conv(weights, layer[0], x, *layer[4:])
  for block, kind, branches in _BLOCKS:
    x = _block(weights, block, kind, branches, x)
  return jnp.mean(x, axis=(1, 2))


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
  """A state dict of the right shapes with random values (tests and benchmarks)."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in expected_shapes().items():
    if key.endswith("conv.weight"):
      fan_in = shape[1] * shape[2] * shape[3]
      state[key] = rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
    elif key.endswith("running_var") or key.endswith("bn.weight"):
      state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      state[key] = rng.normal(0, 0.1, shape).astype(np.float32)
  return state
