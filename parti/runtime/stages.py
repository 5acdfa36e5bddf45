"""Jobs run as stages: each a subprocess `python -m MODULE --gin_file=... --gin.KEY=...`,
skipped once done and resumed when interrupted; and the demo's seven stages.

The demo and the scaling study (which reuses the demo's first four stages) run their
jobs through here, as the same commands a TPU-pod user types, rather than importing them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from parti.runtime import files, metric_logging
from parti.runtime.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
  """One job of a pipeline: its module, gin file and the folders it reads and writes."""

  name: str
  module: str
  gin_file: str
  bindings: dict[str, str]
  has_long_variant: bool = False
  after: Callable[[], None] | None = None  # A check run once the job succeeds.
  long_only: bool = False  # A stage of the long variant alone.
  long_bindings: dict[str, str] = dataclasses.field(default_factory=dict)  # Added when long.

  def command(self, long: bool) -> list[str]:
    gin_file = self.gin_file
    if long and self.has_long_variant:
      gin_file = gin_file.replace(".gin", "_long.gin")
    bindings = {**self.bindings, **(self.long_bindings if long else {})}
    return [
      sys.executable,
      "-m",
      self.module,
      f"--gin_file={gin_file}",
      *(f"--gin.{key}={value}" for key, value in bindings.items()),
    ]


def demo_stages(runs: pathlib.Path, long: bool = False) -> list[Stage]:
  """The demo's seven stages, writing under `runs`; ten for the long variant, whose
  fine-tuning for editing and super-resolution stage (its data and training) fit its
  budget, not the short one's."""
  tfds, tokenizer, tokens, parti = (runs / n for n in ("tfds", "tokenizer", "tokens", "parti"))
  upsampler = runs / "upsampler"
  plan = [
    Stage(
      "data", "parti.tasks.prepare_shapes", "gin/demo/data.gin", {"DATA_DIR": str(tfds)},
      has_long_variant=True,
    ),
    Stage(
      "vocab", "parti.tasks.train_vocab", "gin/demo/vocab.gin", {"MODEL_DIR": str(runs / "vocab")},
      after=lambda: _compare_vocabulary(runs / "vocab" / "parti_shapes.model"),
    ),
    Stage(
      "tokenizer", "parti.tokenizer.train", "gin/demo/tokenizer.gin",
      {"MODEL_DIR": str(tokenizer), "TFDS_DATA_DIR": str(tfds)}, has_long_variant=True,
    ),
    Stage(
      "encode", "parti.tokenizer.encode", "gin/demo/encode.gin",
      {"CHECKPOINT_DIR": str(tokenizer), "OUTPUT_DIR": str(tokens), "TFDS_DATA_DIR": str(tfds)},
      has_long_variant=True,
    ),
    Stage(
      "parti", "parti.train", "gin/demo/parti.gin",
      {"MODEL_DIR": str(parti), "PRE_ENCODED_DIR": str(tokens)}, has_long_variant=True,
    ),
    Stage(
      "parti_edit", "parti.train", "gin/demo/parti_edit.gin",
      {"MODEL_DIR": str(runs / "parti_edit"), "INITIAL_CHECKPOINT_DIR": str(parti),
       "PRE_ENCODED_DIR": str(tokens)}, long_only=True,
    ),
    Stage(
      "upsampler_data", "parti.tasks.prepare_shapes", "gin/demo/upsampler_data.gin",
      {"DATA_DIR": str(tfds)}, long_only=True,
    ),
    Stage(
      "upsampler", "parti.train_upsampler", "gin/demo/upsampler.gin",
      {"MODEL_DIR": str(upsampler), "TFDS_DATA_DIR": str(tfds)}, long_only=True,
    ),
    Stage(
      "infer", "parti.infer", "gin/demo/infer.gin",
      {"CHECKPOINT_DIR": str(parti), "TOKENIZER_DIR": str(tokenizer),
       "PROMPTS": str(runs / "held_out_prompts.txt"), "OUTPUT_DIR": str(runs / "infer")},
      has_long_variant=True, long_bindings={"UPSAMPLER_DIR": str(upsampler)},
    ),
    Stage(
      "evaluate", "parti.evaluate_shapes", "gin/demo/evaluate.gin",
      {"CHECKPOINT_DIR": str(parti), "TOKENIZER_DIR": str(tokenizer),
       "OUTPUT_DIR": str(runs / "evaluate")},
    ),
  ]  # fmt: skip
  return [stage for stage in plan if long or not stage.long_only]


def run_stages(
  runs: pathlib.Path, plan: Sequence[Stage], long: bool = False, only: Sequence[str] = ()
) -> dict[str, float]:
  """Runs each stage not done yet, in order, as a subprocess logging to RUNS/STAGE.log.

  Returns the seconds of each stage run by this call. A stage that fails raises
  RuntimeError with its log's tail; the stages before it stay done.
  """
  seconds: dict[str, float] = {}
  started = time.perf_counter()
  for number, stage in enumerate(plan, start=1):
    if only and stage.name not in only:
      continue
    done = runs / f"{stage.name}.done"
    command = stage.command(long)
    fingerprint = config_fingerprint(command)
    if done.is_file():
      _check_unchanged(stage, done, fingerprint)
      print(f"[{number}/{len(plan)}] {stage.name}: done earlier, skipped", flush=True)
      continue
    print(
      f"[{number}/{len(plan)}] {stage.name} "
      f"(elapsed {metric_logging.format_duration(time.perf_counter() - started)}): "
      f"{shlex.join(command[1:])}",
      flush=True,
    )
    stage_start = time.perf_counter()
    log = runs / f"{stage.name}.log"
    with open(log, "ab") as handle:
      result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if result.returncode:
      tail = log.read_text(errors="replace").splitlines()[-15:]
      raise RuntimeError(
        f"Stage {stage.name} failed (exit {result.returncode}); its log is {log}. Fix the cause "
        "and rerun: finished stages are skipped and this one resumes.\n" + "\n".join(tail)
      )
    seconds[stage.name] = time.perf_counter() - stage_start
    if stage.after:
      stage.after()
    files.atomic_write_json(
      done, {"seconds": seconds[stage.name], "command": command, "config": fingerprint}
    )
    print(
      f"    {stage.name} took {metric_logging.format_duration(seconds[stage.name])}", flush=True
    )
  return seconds


def config_fingerprint(command: Sequence[str]) -> str:
  """A hash of what configures a stage's command: its module, its gin file and the files
  that file includes. Not the bindings: they name folders, and a run folder that moved
  holds the same runs."""
  from parti.runtime import gin_utils

  digest = hashlib.sha256()
  for arg in command[2:]:  # The module and its flags; not the interpreter's path.
    if arg.startswith("--gin_file="):
      for path in gin_utils.config_files(arg.split("=", 1)[1]):
        digest.update(path.read_bytes() + b"\0")
    elif not arg.startswith("--gin."):
      digest.update(arg.encode() + b"\0")
  return digest.hexdigest()


def _check_unchanged(stage: Stage, done: pathlib.Path, fingerprint: str) -> None:
  """Refuses to skip a stage whose configuration changed since it ran.

  Skipping would report the old configuration's results as the new one's, and
  rerunning into the same folders would resume the old run's checkpoints under the new
  configuration; so the user chooses. Stamps written before fingerprints existed pass.
  """
  try:
    recorded = json.loads(done.read_text()).get("config")
  except (OSError, ValueError) as error:
    raise ConfigError(f"Stage {stage.name}'s stamp {done} is unreadable ({error}).") from error
  if recorded is not None and recorded != fingerprint:
    raise ConfigError(
      f"Stage {stage.name} was done with another configuration: its gin file or a file it "
      f"includes changed since. Its outputs are kept. To run it again with the new "
      f"configuration, delete {done} and the folders it wrote (of "
      f"{', '.join(stage.bindings.values())}), then rerun; or restore the configuration it "
      "ran with."
    )


def _compare_vocabulary(trained: pathlib.Path) -> None:
  from parti.sampling.prompts import shapes_vocabulary_path

  shipped = shapes_vocabulary_path()
  if trained.read_bytes() == shipped.read_bytes():
    print(f"    the trained vocabulary is the one shipped in {shipped}", flush=True)
  else:
    print(
      f"    warning: {trained} differs from the shipped {shipped}, which the shapes tasks "
      "read (another sentencepiece version?)",
      flush=True,
    )
