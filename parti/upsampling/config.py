"""The upsampler's architecture as a frozen dataclass; gin sets its fields.

Parti's super-resolution module is WDSR-based (Yu et al. 2018, "Wide Activation for
Efficient and Accurate Image Super-Resolution") and conditioned on the image alone;
the paper gives no sizes, so `PRESETS` takes WDSR-B's: 32 features widened 6x inside
each block with a low-rank 0.8x projection. The paper's 256 -> 1024 and 256 -> 512
stages get 32 blocks (WDSR-B's deepest published setting), the CPU-sized shapes
stage 8.
"""

from __future__ import annotations

import dataclasses

from parti.runtime.config_files import JsonConfig
from parti.runtime.errors import ConfigError
from parti.runtime.validation import check_types


@dataclasses.dataclass(frozen=True)
class UpsamplerConfig(JsonConfig):
  """A WDSR-B upsampler.

  Attributes:
    input_size: side of the square input images (the tokenizer's image size).
    scale: the upscaling factor, 2 or 4: outputs are input_size * scale square.
    num_blocks: wide-activation residual blocks.
    features: channels between blocks.
    expansion: each block widens to features * expansion before its activation.
    low_rank: each block's low-rank projection keeps features * low_rank channels.
    res_scale: each block's branch is scaled by this before the residual add.
    dtype: compute dtype of the convolutions ("float32" or "bfloat16").
  """

  input_size: int = 256
  scale: int = 4
  num_blocks: int = 32
  features: int = 32
  expansion: int = 6
  low_rank: float = 0.8
  res_scale: float = 1.0
  dtype: str = "bfloat16"

  def __post_init__(self):
    check_types(self)
    if self.scale not in (2, 4):
      raise ConfigError(f"UpsamplerConfig.scale must be 2 or 4, not {self.scale}.")
    for field in ("input_size", "num_blocks", "features", "expansion"):
      if getattr(self, field) < 1:
        raise ConfigError(f"UpsamplerConfig.{field} must be positive.")
    if not 0 < self.low_rank <= self.expansion:
      raise ConfigError(
        f"UpsamplerConfig.low_rank must lie in (0, expansion], not {self.low_rank}."
      )
    if self.dtype not in ("float32", "bfloat16"):
      raise ConfigError(f"UpsamplerConfig.dtype must be float32 or bfloat16, not {self.dtype!r}.")

  @property
  def output_size(self) -> int:
    return self.input_size * self.scale

  @property
  def low_rank_features(self) -> int:
    return max(1, round(self.features * self.low_rank))


PRESETS: dict[str, UpsamplerConfig] = {
  # Parti's stage: 256 -> 1024, and its 2x variant.
  "paper_4x": UpsamplerConfig(input_size=256, scale=4, num_blocks=32),
  "paper_2x": UpsamplerConfig(input_size=256, scale=2, num_blocks=32),
  # The shapes on CPU: 64 -> 256 with a quarter of the depth, in float32 (CPUs have no
  # fast bfloat16 convolutions).
  "shapes_4x": UpsamplerConfig(input_size=64, scale=4, num_blocks=8, dtype="float32"),
}
