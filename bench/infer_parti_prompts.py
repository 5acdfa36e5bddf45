"""The batch inference job on PartiPrompts, end to end: images/s, where the time goes, resume cost.

    python bench/infer_parti_prompts.py --prompts=../shared/data/PartiPrompts.tsv \
      --checkpoint_dir=runs/demo/parti --tokenizer_dir=runs/demo/tokenizer [--limit=512]

Runs `parti.infer.infer` (the job itself, not a copy) over the benchmark's
prompts into a fresh folder, with Parti's sampling defaults (guidance 1.2, one
sample per prompt), and reports:

  - the prompts: how many, their categories and challenges, and how many the
    run's text length truncates (PartiPrompts has long, detailed prompts);
  - the job's images/s over the whole run, and the share of its time spent in
    the jitted sampler + tokenizer decoder (the first call, which compiles, is
    reported apart), as the job records them in its timing-00000.json. The rest is the job's own work: reading and encoding
    prompts, moving images to the host, PNG encoding, atomic writes, the
    manifest and the gallery;
  - a rerun over the finished folder: the time to find that nothing is left.

Any checkpoint and tokenizer `parti.infer` accepts will do. The demo's
(`make demo`) were trained on the shapes, so their images of PartiPrompts mean
nothing and their scores are not quality figures; this measures the job.
"""

from __future__ import annotations

import collections
import json
import pathlib
import tempfile
import time

import jax
from absl import app, flags

from parti import infer, partitioning
from parti.modeling import checkpoint_io
from parti.runtime.errors import ConfigError
from parti.sampling import generation
from parti.sampling.prompts import PromptEncoder, read_prompts

_PROMPTS = flags.DEFINE_string("prompts", None, "A PartiPrompts-format TSV.", required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint_dir", "runs/demo/parti", "A parti.train MODEL_DIR.")
_TOKENIZER = flags.DEFINE_string("tokenizer_dir", "runs/demo/tokenizer", "Its tokenizer.")
_VOCABULARY = flags.DEFINE_string("vocabulary", None, "SentencePiece model (default: shapes).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Only the first N prompts (0: all).")
_BATCH = flags.DEFINE_integer("batch", 16, "Prompts per batch.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where the images go (default: a temp folder).")


def main(argv):
  del argv
  prompts = read_prompts(_PROMPTS.value)
  if _LIMIT.value:
    prompts = prompts[: _LIMIT.value]
  if len(prompts) <= _BATCH.value:
    raise SystemExit("Measure at least two batches: raise --limit or lower --batch.")
  try:
    config = checkpoint_io.load_config(_CHECKPOINT.value)
  except ConfigError as error:
    message = f"{error} Run `make demo` first, or pass --checkpoint_dir and --tokenizer_dir."
    raise SystemExit(message) from error
  encoder = PromptEncoder(config.text_length, _VOCABULARY.value)
  lengths = [encoder.piece_count(p.text) for p in prompts]
  truncated = sum(length > config.text_length - 1 for length in lengths)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; jax {jax.__version__}")
  print(
    f"{len(prompts)} prompts, {len({p.category for p in prompts})} categories, "
    f"{len({p.challenge for p in prompts})} challenges; {encoder.path.name}: median "
    f"{sorted(lengths)[len(lengths) // 2]} pieces, {truncated} truncated at text length "
    f"{config.text_length}"
  )
  folder = pathlib.Path(_OUTPUT.value or tempfile.mkdtemp(prefix="parti_prompts_"))
  folder.mkdir(parents=True, exist_ok=True)
  subset = pathlib.Path(_PROMPTS.value)
  if _LIMIT.value:
    subset = folder / "prompts.tsv"
    subset.write_text(
      "Prompt\tCategory\tChallenge\n"
      + "".join(f"{p.text}\t{p.category}\t{p.challenge}\n" for p in prompts)
    )
  run = dict(
    checkpoint_dir=_CHECKPOINT.value, tokenizer_dir=_TOKENIZER.value, prompts=str(subset),
    output_dir=str(folder / "out"), options=generation.SamplingOptions(), batch_size=_BATCH.value,
    vocabulary=_VOCABULARY.value, mesh=partitioning.MeshConfig(), gallery_every=10,
  )  # fmt: skip
  start_job = time.perf_counter()
  entries = infer.infer(**run)
  start_rerun = time.perf_counter()
  total = start_rerun - start_job
  again = infer.infer(**run)
  rerun = time.perf_counter() - start_rerun
  if again:
    raise RuntimeError(f"The rerun generated {len(again)} prompts again.")
  # What the job itself measured: loading ends when the first call starts, which compiles.
  timing = json.loads((folder / "out" / "timing-00000.json").read_text())
  setup, first = timing["loading_seconds"], timing["first_call_seconds"]
  loop = timing["seconds_after_first_call"]
  sampler = timing["sampler_seconds_after_first_call"]
  images_after_first = len(entries) - _BATCH.value
  print(
    "| prompts | batch | job | images/s | loading | first call | after it: images/s | sampler share | rerun |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  print(
    f"| {len(entries)} | {_BATCH.value} | {total:.1f} s | {len(entries) / total:.2f} | "
    f"{setup:.1f} s | {first:.1f} s | {images_after_first / loop:.2f} | "
    f"{100 * sampler / loop:.0f}% | {rerun:.1f} s |"
  )
  by_category = collections.Counter(e["category"] for e in entries)
  print("prompts per category:", ", ".join(f"{c} {n}" for c, n in by_category.most_common()))
  print(f"outputs: {folder / 'out'} (index.html, report.md)")


if __name__ == "__main__":
  app.run(main)
