"""The end-to-end demo: every stage of the system, each run as its real job with its gin file.

    python -m parti.demo --runs_dir=runs/demo              # 6 to 12 minutes on 2 CPU cores
    python -m parti.demo --runs_dir=runs/demo_long --long  # about 40 minutes: 100k scenes, longer

Stages (gin/demo/*.gin; `--long` uses the *_long.gin variants where there are any):

  1. data       prepare the 48x48 shapes and their views           parti.tasks.prepare_shapes
  2. vocab      train the SentencePiece vocabulary on captions    parti.tasks.train_vocab
  3. tokenizer  train the ViT-VQGAN (3x3 patches, 2 codes each)   parti.tokenizer.train
  4. encode     pre-encode the dataset to image tokens            parti.tokenizer.encode
  5. parti      train a small Parti with CFG dropout              parti.train
  6. infer      batch inference on held-out prompts               parti.infer
  7. evaluate   faithfulness over guidance, and learning curve    parti.evaluate_shapes

`--long` adds, before inference, fine-tuning for editing and the super-resolution
stage (they do not fit the short demo's 15-minute budget on a slow machine), and
inference writes each image at 192 px beside the tokenizer's 48:

  parti_edit      fine-tune the Parti with the editing head            parti.train
  upsampler_data  the shapes at 192 px with 48 px twins            parti.tasks.prepare_shapes
  upsampler       train the WDSR upsampler, 48 -> 192              parti.train_upsampler

Each stage is a subprocess running `python -m MODULE --gin_file=... --gin.KEY=...`,
the same command a TPU-pod user runs with bigger configs. A stage that finishes
writes RUNS_DIR/STAGE.done with a hash of its gin files; a rerun skips finished
stages, refuses to skip one whose gin files changed since (naming what to delete),
and resumes an interrupted one (every job resumes from its own checkpoints or
outputs). The last
stage's table, and where the gallery and report are, are printed at the end.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags

from parti.evaluation import shapes_report
from parti.runtime import files, metric_logging, stages
from parti.runtime.errors import ConfigError

HELD_OUT_PROMPTS = 32  # Per split, for the inference stage's gallery.


def write_held_out_prompts(path: pathlib.Path, count: int = HELD_OUT_PROMPTS) -> None:
  """The first test and compositional captions of the shapes dataset, one per line."""
  from parti.tasks.shapes import scenes

  captions = [
    scenes.make_scene(0, split, index).caption
    for split in ("test", "compositional")
    for index in range(count)
  ]
  files.atomic_write_text(path, "\n".join(captions) + "\n")


def run_demo(runs_dir: str, long: bool = False, only: Sequence[str] = ()) -> dict[str, float]:
  """Runs (or resumes) the stages; returns each stage's seconds in this invocation."""
  runs = pathlib.Path(runs_dir).absolute()
  runs.mkdir(parents=True, exist_ok=True)
  plan = stages.demo_stages(runs, long)
  unknown = set(only) - {s.name for s in plan}
  if unknown:
    raise ConfigError(f"Unknown demo stages {sorted(unknown)}; they are {[s.name for s in plan]}.")
  marker = runs / "profile.json"
  profile = {"long": long}
  if marker.is_file() and json.loads(marker.read_text()) != profile:
    raise ConfigError(
      f"{runs} holds a demo run with {marker.read_text().strip()}; use another --runs_dir "
      "for the other variant."
    )
  files.atomic_write_json(marker, profile)
  write_held_out_prompts(runs / "held_out_prompts.txt")
  seconds = stages.run_stages(runs, plan, long, only)
  _summary(runs, plan)
  return seconds


def _last_metrics(model_dir: pathlib.Path, keys: Sequence[str]) -> dict[str, float]:
  found: dict[str, float] = {}
  if (model_dir / "metrics.jsonl").is_file():
    for _, row in sorted(metric_logging.read_metrics(model_dir).items()):
      found.update({k: row[k] for k in keys if k in row})
  return found


def _summary(runs: pathlib.Path, plan: Sequence[stages.Stage]) -> None:
  """Prints the faithfulness table and where the outputs are."""
  total = sum(
    json.loads((runs / f"{s.name}.done").read_text())["seconds"]
    for s in plan
    if (runs / f"{s.name}.done").is_file()
  )
  print(f"\nAll stages: {metric_logging.format_duration(total)} of job time.")
  tokenizer = _last_metrics(runs / "tokenizer", ["eval/psnr", "eval/codebook_usage"])
  if tokenizer:
    print(
      f"Tokenizer: held-out PSNR {tokenizer.get('eval/psnr', float('nan')):.1f} dB, "
      f"codebook usage {100 * tokenizer.get('eval/codebook_usage', float('nan')):.0f}%."
    )
  parti = _last_metrics(runs / "parti", ["eval/loss", "eval/text_gap", "eval/object_text_gap"])
  if parti:
    print(
      f"Parti: held-out loss {parti.get('eval/loss', float('nan')):.3f}; the prompt is worth "
      f"{parti.get('eval/text_gap', float('nan')):.2f} nats per token, "
      f"{parti.get('eval/object_text_gap', float('nan')):.2f} per object token."
    )
  results_file = runs / "evaluate" / shapes_report.REPORT_JSON
  if results_file.is_file():
    results = json.loads(results_file.read_text())["results"]
    prompts = {
      split: int(table["overall"]["prompts"])
      for split, table in next(iter(results.values())).items()
    }
    counts = ", ".join(f"{prompts[split]} {split}" for split in sorted(prompts, key=_split_order))
    print(f"Faithfulness (all attributes right; prompts: {counts}):")
    print(summary_table(results))
  for label, path in (
    ("gallery", runs / "infer" / "index.html"),
    ("evaluation report", runs / "evaluate" / shapes_report.REPORT),
    ("accuracy vs guidance", runs / "evaluate" / shapes_report.PLOT),
    ("learning curve", runs / "evaluate" / shapes_report.CURVE_PLOT),
    ("tokenizer reconstructions", runs / "tokenizer"),
  ):
    if path.exists():
      print(f"{label}: {path}")


def _split_order(split: str) -> int:
  from parti.tasks.shapes import spec

  return spec.SPLITS.index(split) if split in spec.SPLITS else len(spec.SPLITS)


def summary_table(results: dict) -> str:
  """Faithfulness (all attributes right) by prompt kind, a column per (split, λ)."""
  from parti.tasks.shapes import spec

  scales = sorted(results, key=float)
  columns = [
    (split, scale) for scale in scales for split in sorted(results[scale], key=_split_order)
  ]
  present = {kind for split, scale in columns for kind in results[scale][split]}
  # The evaluator's order of prompt kinds (JSON may have sorted them), "overall" last.
  kinds = [k for k in spec.KINDS if k in present] + sorted(present - {*spec.KINDS, "overall"})
  kinds += ["overall"] if "overall" in present else []
  header = "| prompt kind | " + " | ".join(f"{s} λ={g}" for s, g in columns) + " |"
  lines = [header, "|---|" + "---|" * len(columns)]
  for kind in kinds:
    cells = []
    for split, scale in columns:
      table = results[scale][split].get(kind)
      cells.append(f"{100 * table['all']:.0f}%" if table and "all" in table else "-")
    lines.append(f"| {kind} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  try:
    run_demo(flags.FLAGS.runs_dir, flags.FLAGS.long, flags.FLAGS.stages)
  except (ConfigError, RuntimeError) as error:
    print(f"demo: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  # Defined here, not at import, so that parti.scaling can import this module.
  flags.DEFINE_string("runs_dir", "runs/demo", "Where every stage writes.")
  flags.DEFINE_bool("long", False, "The longer variant (~40 minutes): more data and training.")
  flags.DEFINE_list("stages", [], "Run only these stages (default: all, in order).")
  app.run(main)
