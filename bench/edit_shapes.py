"""Editing on the shapes: zero-shot edits against the naive baseline, per edit kind.

    python bench/edit_shapes.py --checkpoint_dir=runs/demo/parti --tokenizer_dir=runs/demo/tokenizer
      [--examples=100] [--samples=8] [--figure=docs/images/edits.png]

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
from parti.tasks.shapes import edits, evaluate
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


def requests(kind: str, folder: pathlib.Path, size: int) -> list[tuple[edits.EditTask, Prompt]]:
  """The kind's tasks as edit requests with their files in `folder`."""
  out = []
  for index in range(_EXAMPLES.value):
    task = edits.make_task(_SEED.value, kind, index)
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


def main(argv):
  del argv
  mesh = partitioning.local_mesh()
  rules = partitioning.RULE_SETS["data_parallel"]
  config, params, _, step = checkpoint_io.load_params(_CHECKPOINT.value, mesh, rules)
  tok_config, tok_params, _ = tokenizer_io.load_for_model(_TOKENIZER.value, config)
  tokenizer = ImageTokenizer(tok_config, tok_params)
  encoder = PromptEncoder(config.text_length)
  samples, length = _SAMPLES.value, config.image_length
  sample = jax.jit(
    lambda p, text, keys, kept, keep: decoding.sample(
      config, p, text, keys, guidance_scale=_SCALE.value, top_k=_TOP_K.value,
      keep=(kept, keep),
    )
  )  # fmt: skip
  refine = jax.jit(
    lambda p, text, tokens, redraw: editing.refine(
      config, p, text, tokens, redraw, guidance_scale=_SCALE.value, top_k=_TOP_K.value,
      sweeps=_SWEEPS.value,
    )[0]
  )  # fmt: skip
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
        for name in ("zero-shot", "refined", "input decoded")
      }
      token_preserved = min(
        np.mean([np.array_equal(c[~r], e.tokens[~r]) for c, r, e in
                 zip(chosen[name], redraw, prepared, strict=True)])
        for name in ("zero-shot", "refined", "naive", "prefix-best")
      )  # fmt: skip
      # The first task the refined edit got right (the table has the rates).
      right = [
        i for i, t in enumerate(tasks) if evaluate.score(images["refined"][i], t.target)["all"]
      ]
      first = right[0] if right else 0
      shown[kind] = (prepared[first], images["refined"][first], tasks[first].target.caption)
      rows.append(
        f"| {kind} | {len(pairs)} | {success['zero-shot']:.1%} | {success['refined']:.1%} | "
        f"{success['naive']:.1%} | {success['prefix-best']:.1%} | {success['generation']:.1%} | "
        f"{preserved['zero-shot']:.1%} / {preserved['refined']:.1%} / "
        f"{preserved['input decoded']:.1%} | {token_preserved:.1%} | "
        f"{seconds:.3f} / {seconds + refine_seconds:.3f} |"
      )
      print(rows[-1], flush=True)
  print("\n".join(rows))
  if _FIGURE.value:
    write_figure(pathlib.Path(_FIGURE.value), shown)


def write_figure(path: pathlib.Path, shown: dict) -> None:
  """A row per kind (its first task the refined edit got right): input, redrawn tokens
  (white) and the edit, enlarged 3x, under the prompt."""
  from PIL import ImageDraw

  side = next(iter(shown.values()))[0].image.shape[0] * 3
  label = 70
  row_height = side + 20
  canvas = Image.new("RGB", (label + 3 * (side + 6), len(shown) * row_height + 16), "white")
  draw = ImageDraw.Draw(canvas)
  for col, name in enumerate(("input", "redrawn", "edit")):
    draw.text((label + col * (side + 6) + 2, 2), name, fill="black")
  for row, (kind, (edit, image, prompt)) in enumerate(shown.items()):
    top = 16 + row * row_height
    draw.text((2, top + side // 2), kind, fill="black")
    draw.text((label, top + side + 2), f'"{prompt}"', fill="black")
    mask = np.repeat(edit.token_mask_image[..., None] * 255, 3, axis=-1).astype(np.uint8)
    for col, tile in enumerate((edit.image, mask, image)):
      big = Image.fromarray(tile).resize((side, side), Image.Resampling.NEAREST)
      canvas.paste(big, (label + col * (side + 6), top))
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
