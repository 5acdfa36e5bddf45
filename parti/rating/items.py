"""What raters compare: the prompts that every run finished, one item per pair of runs.

Each run is a `parti.infer` OUTPUT_DIR; its manifests say which prompts it finished and
with which files. An item shows one prompt's first kept image from each of two runs.
Only the files named here are ever served: the app looks images up by item and side,
and no part of a request becomes a path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import pathlib
import random
from collections.abc import Sequence

from absl import logging

from parti.runtime.errors import ConfigError
from parti.sampling import manifests


@dataclasses.dataclass(frozen=True)
class Item:
  """One prompt's images from two runs.

  Attributes:
    id: a digest of the two runs' names and the request, stable across restarts.
    runs: the two runs' names.
    prompt: the prompt's text.
    category: its PartiPrompts Category ("" if the runs' prompts have none).
    challenge: its PartiPrompts Challenge ("" if none).
    images: the two runs' first kept images, in the order of `runs`.
  """

  id: str
  runs: tuple[str, str]
  prompt: str
  category: str
  challenge: str
  images: tuple[pathlib.Path, pathlib.Path]

  def left_run(self, rater: str) -> str:
    """The run shown on the left to `rater`: random per item and rater, the same on
    every visit (so a reload does not swap the images under a half-given answer)."""
    digest = hashlib.sha256(f"{rater}\0{self.id}".encode()).digest()
    return self.runs[digest[0] % 2]


@dataclasses.dataclass(frozen=True)
class RatingSet:
  """The items of a set of runs, and what was left out of them."""

  run_names: tuple[str, ...]
  items: tuple[Item, ...]
  dropped_prompts: int  # finished by some of the runs but not all

  def by_id(self) -> dict[str, Item]:
    return {item.id: item for item in self.items}

  def order_for(self, rater: str) -> list[Item]:
    """The items in the order `rater` sees them: shuffled per rater, fixed across visits."""
    order = list(self.items)
    random.Random(hashlib.sha256(rater.encode()).hexdigest()).shuffle(order)
    return order


def _names(run_dirs: Sequence[pathlib.Path]) -> list[str]:
  """Each run's folder name, with its parents' names added until the names differ."""
  for depth in range(1, max(len(p.parts) for p in run_dirs) + 1):
    names = ["/".join(p.parts[-depth:]) for p in run_dirs]
    if len(set(names)) == len(names):
      return names
  raise ConfigError(f"The runs {[str(p) for p in run_dirs]} are not distinct folders.")


def load_runs(run_dirs: Sequence[str]) -> RatingSet:
  """The items of every pair of runs over the prompts all of them finished.

  Raises:
    ConfigError: fewer than two runs, a folder that is not an inference output (no
      manifest), a run with no finished prompt, or no prompt that every run finished.
  """
  paths = [pathlib.Path(p).resolve() for p in run_dirs]
  if len(paths) < 2:
    raise ConfigError(f"Rating compares two runs or more; got {[str(p) for p in paths]}.")
  finished = []
  for path in paths:
    if not path.is_dir() or not any(path.glob("manifest-*.jsonl")):
      raise ConfigError(
        f"{path} has no manifest-*.jsonl: give parti.infer output folders (OUTPUT_DIR)."
      )
    done = manifests.finished_prompts(path)
    if not done:
      raise ConfigError(f"{path} has no finished prompt whose image files all exist.")
    finished.append(done)
  names = _names(paths)
  shared = set.intersection(*(set(done) for done in finished))
  everything = set.union(*(set(done) for done in finished))
  if not shared:
    raise ConfigError(f"The runs {names} have no finished prompt in common: nothing to rate.")
  if len(everything) > len(shared):
    logging.warning(
      "Rating the %d prompts that all %d runs finished; %d prompts finished by only some "
      "of them are dropped.", len(shared), len(paths), len(everything) - len(shared),
    )  # fmt: skip
  # In the first run's order.
  keys = sorted(shared, key=lambda key: finished[0][key].get("index", 0))
  items = []
  for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
    for key in keys:
      first = finished[i][key]
      digest = hashlib.sha256(f"{a}\0{b}\0{key}".encode()).hexdigest()[:16]
      items.append(
        Item(
          id=digest,
          runs=(a, b),
          prompt=first["prompt"],
          category=first.get("category") or "",
          challenge=first.get("challenge") or "",
          images=(paths[i] / first["files"][0], paths[j] / finished[j][key]["files"][0]),
        )
      )
  return RatingSet(tuple(names), tuple(items), len(everything) - len(shared))
