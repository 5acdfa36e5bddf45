"""Editing on the shapes: zero-shot edits against the naive baseline, per edit kind.

    python bench/edit_shapes.py --checkpoint_dir=runs/demo_long/parti
      --tokenizer_dir=runs/demo_long/tokenizer [--finetuned_dir=runs/demo_long/parti_edit]
      [--examples=100] [--samples=8] [--placement=centered] [--figure=docs/images/edits.png]

For each kind of `parti.tasks.shapes.edits` (recolor, reshape, remove, add, outpaint),
--examples tasks are written as real edit requests (the source image, and a mask PNG
of the cells to redraw, or an `extend` for outpainting) and prepared by
`parti.sampling.editing`, as the inference job prepares them. Each is sampled
--samples times with the kept tokens fed as given, then:

  zero-shot  the candidate whose whole sequence (kept suffix included) is likeliest
  naive      the first candidate: the masked tokens resampled from the prefix alone
  prefix-best  of the candidates, the likeliest up to the last redrawn token (the
             suffix ignored, with as many samples as zero-shot)
  refined    zero-shot's choice improved by `editing.refine` (iterated conditional
             modes: each redrawn token set to the code, of the top-k there, that makes
             the whole sequence likeliest; --sweeps passes)

Each is scored by the shapes evaluator against the target scene (success), checked for
the target's objects outside the redrawn cells (preservation), and for its kept tokens
being the source's own (token preservation). For reference, the model's own
generation from the same prompts, with the same samples ranked by likelihood.

With --finetuned_dir (a run of gin/editing/finetune_shapes.gin: the same model with
the editing head), a second table: its edits, the encoder reading the image with the
redrawn tokens masked (the likeliest of the same number of samples, and refined), and
its own generation (no image) beside the text-to-image model's.
"""

from __future__ import annotations

import pathlib
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from parti import partitioning
from parti.modeling import checkpoint_io
from parti.sampling import decoding, editing
from parti.sampling.prompts import Prompt, PromptEncoder
from parti.tasks.shapes import edits, evaluate, spec
from parti.tokenizer import checkpoint_io as tokenizer_io
from parti.tokenizer.api import ImageTokenizer

_CHECKPOINT = flags.DEFINE_string("checkpoint_dir", "runs/demo/parti", "A parti.train run.")
_TOKENIZER = flags.DEFINE_string("tokenizer_dir", "runs/demo/tokenizer", "Its tokenizer's run.")
_EXAMPLES = flags.DEFINE_integer("examples", 100, "Edit tasks per kind.")
_SAMPLES = flags.DEFINE_integer("samples", 8, "Candidates per edit.")
_SCALE = flags.DEFINE_float("guidance_scale", 2.0, "Classifier-free guidance.")
_TOP_K = flags.DEFINE_integer("top_k", 64, "Sample among the k likeliest codes.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the tasks and the samples.")
_KINDS = flags.DEFINE_list("kinds", list(edits.KINDS), "Edit kinds to run.")
_FIGURE = flags.DEFINE_string("figure", "", "Where to write input, mask and edit per kind.")
_SWEEPS = flags.DEFINE_integer("sweeps", 2, "Passes of iterated conditional modes (refined).")
_PLACEMENT = flags.DEFINE_enum(
  "placement", "centered", spec.PLACEMENTS,
  "The tasks' scenes: the demo's models are trained on centered objects.",
)  # fmt: skip
_FINETUNED = flags.DEFINE_string(
  "finetuned_dir", "", "A run fine-tuned for editing (gin/editing/finetune_shapes.gin)."
)


def requests(kind: str, folder: pathlib.Path, size: int) -> list[tuple[edits.EditTask, Prompt]]:
  """The kind's tasks as edit requests with their files in `folder`."""
  out = []
  for index in range(_EXAMPLES.value):
    task = edits.make_task(_SEED.value, kind, index, placement=_PLACEMENT.value)
    image = folder / f"{kind}_{index}.png"
    Image.fromarray(task.source_image(size)).save(image)
    fields = {"image": str(image), "source": f"{kind} task {index}"}
    if task.crop:
      fields["extend"] = task.extend(size)
    else:
      mask = folder / f"{kind}_{index}_mask.png"
      Image.fromarray((task.pixel_box(size) * 255).astype(np.uint8)).save(mask)
      fields["mask"] = str(mask)
    out.append((task, Prompt(task.target.caption, **fields)))
  return out


def to_uint8(images: np.ndarray) -> np.ndarray:
  return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)


def samplers(config):
  """The model's jitted (sample, refine); both take an image context last (None: none)."""
  sample = jax.jit(
    lambda p, text, keys, kept, keep, context=None: decoding.sample(
      config, p, text, keys, guidance_scale=_SCALE.value, top_k=_TOP_K.value,
      keep=(kept, keep), edit_context=context,
    )
  )  # fmt: skip
  refine = jax.jit(
    lambda p, text, tokens, redraw, context=None: editing.refine(
      config, p, text, tokens, redraw, guidance_scale=_SCALE.value, top_k=_TOP_K.value,
      sweeps=_SWEEPS.value, context=context,
    )[0]
  )  # fmt: skip
  return sample, refine


def timed(function, *args):
  """(function(*args) as numpy, seconds), the compilation run first and not timed."""
  jax.block_until_ready(function(*args))
  start = time.perf_counter()
  result = jax.tree_util.tree_map(np.asarray, jax.block_until_ready(function(*args)))
  return result, time.perf_counter() - start


def main(argv):
  del argv
  mesh = partitioning.local_mesh()
  rules = partitioning.RULE_SETS["data_parallel"]
  config, params, _, step = checkpoint_io.load_params(_CHECKPOINT.value, mesh, rules)
  tok_config, tok_params, _ = tokenizer_io.load_for_model(_TOKENIZER.value, config)
  tokenizer = ImageTokenizer(tok_config, tok_params)
  encoder = PromptEncoder(config.text_length)
  samples, length = _SAMPLES.value, config.image_length
  sample, refine = samplers(config)
  finetuned = None
  if _FINETUNED.value:
    ft_config, ft_params, _, ft_step = checkpoint_io.load_params(_FINETUNED.value, mesh, rules)
    if not ft_config.edit_context:
      raise SystemExit(f"{_FINETUNED.value} has no editing head (PartiConfig.edit_context).")
    finetuned = (ft_config, ft_params, *samplers(ft_config))
    print(f"Fine-tuned for editing: {_FINETUNED.value} step {ft_step}")
  ft_header = (
    "| kind | tasks | fine-tuned | fine-tuned, refined | its generation (no edit) | "
    "text-to-image model's generation | preservation (fine-tuned / refined) | "
    "token preservation | s / edit (fine-tuned / refined) |"
  )
  ft_rows = [ft_header, "|---" * 9 + "|"]
  print(f"Parti {_CHECKPOINT.value} step {step}; {_EXAMPLES.value} tasks per kind, {samples} "
        f"samples each, guidance {_SCALE.value}, top-k {_TOP_K.value}, {_SWEEPS.value} sweeps")  # fmt: skip
  header = (
    "| kind | tasks | zero-shot | refined | naive | prefix-best | generation (no edit) | "
    "preservation (zero-shot / refined / the input's own decoding) | token preservation | "
    "s / edit (zero-shot / refined) |"
  )
  rows, shown = [header, "|---" * 10 + "|"], {}
  with tempfile.TemporaryDirectory() as folder:
    for kind in _KINDS.value:
      pairs = requests(kind, pathlib.Path(folder), tok_config.image_size)
      tasks = [task for task, _ in pairs]
      prepared = [editing.prepare(prompt, tok_config, tokenizer.encode) for _, prompt in pairs]
      texts = np.stack([encoder.encode(p) for _, p in pairs])
      redraw = np.stack([e.redraw for e in prepared])
      text = np.repeat(texts, samples, axis=0)
      kept = np.repeat(np.stack([e.tokens for e in prepared]), samples, axis=0)
      keep = np.repeat(~redraw, samples, axis=0)
      keys = jax.random.split(jax.random.fold_in(jax.random.key(_SEED.value), len(kind)), len(text))
      sample(params, text, keys, kept, keep)  # Compiles.
      start = time.perf_counter()
      tokens, log_probs = jax.block_until_ready(sample(params, text, keys, kept, keep))
      seconds = (time.perf_counter() - start) / len(pairs)
      tokens = np.asarray(tokens).reshape(len(pairs), samples, length)
      log_probs = np.asarray(log_probs).reshape(len(pairs), samples, length)
      last = redraw.shape[1] - 1 - np.argmax(redraw[:, ::-1], axis=1)  # Last redrawn token.
      upto = np.arange(length)[None, None, :] <= last[:, None, None]
      picks = {
        "zero-shot": log_probs.sum(-1).argmax(-1),
        "naive": np.zeros(len(pairs), int),
        "prefix-best": np.where(upto, log_probs, 0).sum(-1).argmax(-1),
      }
      chosen = {name: tokens[np.arange(len(pairs)), pick] for name, pick in picks.items()}
      refine(params, texts, chosen["zero-shot"], redraw)  # Compiles.
      start = time.perf_counter()
      chosen["refined"] = np.asarray(
        jax.block_until_ready(refine(params, texts, chosen["zero-shot"], redraw))
      )
      refine_seconds = (time.perf_counter() - start) / len(pairs)
      # The model's own generation from the same prompts, nothing kept.
      generated, generated_lp = sample(params, text, keys, kept, np.zeros_like(keep))
      generated = np.asarray(generated).reshape(len(pairs), samples, length)
      best = np.asarray(generated_lp).reshape(len(pairs), samples, length).sum(-1).argmax(-1)
      chosen["generation"] = generated[np.arange(len(pairs)), best]
      chosen["input decoded"] = np.stack([e.tokens for e in prepared])
      if finetuned:
        ft_seconds = fine_tuned_edits(finetuned, chosen, text, texts, keys, kept, keep, redraw)
      images = {
        name: to_uint8(tokenizer.decode(t.reshape(-1, *tok_config.grid)))
        for name, t in chosen.items()
      }
      success = {
        name: np.mean([evaluate.score(i, t.target)["all"] for i, t in zip(im, tasks, strict=True)])
        for name, im in images.items()
      }
      preserved = {
        name: np.mean([edits.preserved(i, t) for i, t in zip(images[name], tasks, strict=True)])
        for name in ("zero-shot", "refined", "input decoded", *_FT_EDITS)
        if name in images
      }
      token_preserved = token_preservation(
        chosen, redraw, prepared, ("zero-shot", "refined", "naive", "prefix-best")
      )
      if finetuned:
        ft_rows.append(
          f"| {kind} | {len(pairs)} | {success['fine-tuned']:.1%} | "
          f"{success['fine-tuned refined']:.1%} | {success['fine-tuned generation']:.1%} | "
          f"{success['generation']:.1%} | {preserved['fine-tuned']:.1%} / "
          f"{preserved['fine-tuned refined']:.1%} | {token_preservation(chosen, redraw, prepared, _FT_EDITS):.1%} | "
          f"{ft_seconds[0]:.3f} / {ft_seconds[1]:.3f} |"
        )
        print(ft_rows[-1], flush=True)
      # The first task the refined edit got right (the table has the rates).
      right = [
        i for i, t in enumerate(tasks) if evaluate.score(images["refined"][i], t.target)["all"]
      ]
      first = right[0] if right else 0
      shown[kind] = (
        prepared[first],
        [images[name][first] for name in ("refined", "fine-tuned refined") if name in images],
        tasks[first].target.caption,
      )
      rows.append(
        f"| {kind} | {len(pairs)} | {success['zero-shot']:.1%} | {success['refined']:.1%} | "
        f"{success['naive']:.1%} | {success['prefix-best']:.1%} | {success['generation']:.1%} | "
        f"{preserved['zero-shot']:.1%} / {preserved['refined']:.1%} / "
        f"{preserved['input decoded']:.1%} | {token_preserved:.1%} | "
        f"{seconds:.3f} / {seconds + refine_seconds:.3f} |"
      )
      print(rows[-1], flush=True)
  print("\n".join(rows))
  if finetuned:
    print("\n".join(ft_rows))
  if _FIGURE.value:
    write_figure(pathlib.Path(_FIGURE.value), shown)


def token_preservation(chosen, redraw, prepared, names) -> float:
  """The lowest, over the edits `names`, of the share of edits whose kept tokens are
  exactly the input's."""
  return min(
    np.mean([np.array_equal(c[~r], e.tokens[~r]) for c, r, e in
             zip(chosen[name], redraw, prepared, strict=True)])
    for name in names
  )  # fmt: skip


# The fine-tuned model's edits, scored as the zero-shot ones.
_FT_EDITS = ("fine-tuned", "fine-tuned refined")


def fine_tuned_edits(finetuned, chosen, text, texts, keys, kept, keep, redraw):
  """Adds the fine-tuned model's edits (the likeliest sample, and refined) and its own
  generation to `chosen`; returns the seconds per edit of both."""
  config, params, sample, refine = finetuned
  tasks, samples = len(texts), len(text) // len(texts)
  context = np.where(keep, kept, config.mask_id)
  (tokens, log_probs), seconds = timed(sample, params, text, keys, kept, keep, context)
  best = log_probs.reshape(tasks, samples, -1).sum(-1).argmax(-1)
  chosen["fine-tuned"] = tokens.reshape(tasks, samples, -1)[np.arange(tasks), best]
  task_context = context[::samples]
  chosen["fine-tuned refined"], refine_seconds = timed(
    refine, params, texts, chosen["fine-tuned"], redraw, task_context
  )
  nothing = np.zeros_like(keep)
  generated, generated_lp = sample(
    params,
    text,
    keys,
    kept,
    nothing,  # No context: the head reads an all-masked image.
  )
  best = np.asarray(generated_lp).reshape(tasks, samples, -1).sum(-1).argmax(-1)
  chosen["fine-tuned generation"] = np.asarray(generated).reshape(tasks, samples, -1)[
    np.arange(tasks), best
  ]
  return seconds / tasks, (seconds + refine_seconds) / tasks


def write_figure(path: pathlib.Path, shown: dict) -> None:
  """A row per kind (its first task the refined zero-shot edit got right): input,
  redrawn tokens (white), the zero-shot edit and, if run, the fine-tuned one, enlarged
  3x, under the prompt."""
  from PIL import ImageDraw

  side = next(iter(shown.values()))[0].image.shape[0] * 3
  label = 70
  row_height = side + 20
  names = ("input", "redrawn", "zero-shot", "fine-tuned")[: 2 + len(next(iter(shown.values()))[1])]
  canvas = Image.new(
    "RGB", (label + len(names) * (side + 6), len(shown) * row_height + 16), "white"
  )
  draw = ImageDraw.Draw(canvas)
  for col, name in enumerate(names):
    draw.text((label + col * (side + 6) + 2, 2), name, fill="black")
  for row, (kind, (edit, edited, prompt)) in enumerate(shown.items()):
    top = 16 + row * row_height
    draw.text((2, top + side // 2), kind, fill="black")
    draw.text((label, top + side + 2), f'"{prompt}"', fill="black")
    mask = np.repeat(edit.token_mask_image[..., None] * 255, 3, axis=-1).astype(np.uint8)
    for col, tile in enumerate((edit.image, mask, *edited)):
      big = Image.fromarray(tile).resize((side, side), Image.Resampling.NEAREST)
      canvas.paste(big, (label + col * (side + 6), top))
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
