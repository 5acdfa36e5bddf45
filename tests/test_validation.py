"""Config values of the wrong type are refused at construction, naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from parti.modeling.config import PartiConfig
from parti.runtime.errors import ConfigError
from parti.runtime.validation import check_types
from parti.sampling.generation import SamplingOptions
from parti.training import loop, optim


@dataclasses.dataclass(frozen=True)
class Example:
  steps: int = 1
  rate: float = 0.5
  name: str = "x"
  flag: bool = False
  clip: float | None = None
  grid: tuple[int, int] = (2, 2)


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("steps", "twenty", r"Example.steps = 'twenty' should be an integer"),
    ("steps", 2.5, "should be an integer"),
    ("steps", True, "should be an integer"),
    ("rate", "fast", r"Example.rate = 'fast' should be a number"),
    ("name", 3, "should be a string"),
    ("flag", 1, "should be true or false"),
    ("clip", "none", "should be a number or None"),
    ("grid", (2, "x"), r"should be a sequence \(an integer each\)"),
  ],
)
def test_a_value_of_the_wrong_type_names_its_field(field, value, message):
  with pytest.raises(ConfigError, match=message):
    check_types(Example(**{field: value}))


def test_values_of_the_right_type_pass():
  check_types(Example(steps=3, rate=2, clip=1.5, grid=[3, 3]))  # An int is a number.


def test_the_configs_a_user_binds_check_their_types():
  with pytest.raises(ConfigError, match=r"AdafactorConfig\.learning_rate = 'fast'"):
    optim.AdafactorConfig(learning_rate="fast")
  with pytest.raises(ConfigError, match=r"SamplingOptions\.guidance_scale = 'high'"):
    SamplingOptions(guidance_scale="high")
  with pytest.raises(ConfigError, match=r"Schedule\.num_steps = 'twenty'"):
    loop.Schedule("twenty", 1, 1, 1)
  with pytest.raises(ConfigError, match=r"PartiConfig\.embed_dim"):
    PartiConfig(embed_dim="wide")


@pytest.mark.parametrize(("size", "message"), [(0, "must be positive"), ("8", "an integer")])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused_at_once(size, message):
  from parti import partitioning

  mesh = partitioning.create_mesh(partitioning.MeshConfig())
  with pytest.raises(ConfigError, match=message):
    partitioning.check_batch_size(size, mesh)
