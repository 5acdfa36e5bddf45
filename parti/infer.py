"""Batch inference: prompts in; images, a manifest and a gallery out (t5x-style job).

    python -m parti.infer --gin_file=gin/runs/infer.gin --gin.CHECKPOINT_DIR=runs/parti \
      --gin.TOKENIZER_DIR=runs/tokenizer --gin.PROMPTS=prompts.txt --gin.OUTPUT_DIR=runs/infer

OUTPUT_DIR receives, per prompt (numbered by its place in the prompt list):

  images/NNNNN_DIGEST_K.png  its K best samples of `samples` drawn, written atomically
                        (DIGEST: of the request, so no request writes over another's)
  images/NNNNN_DIGEST_prefix.png  for image completion, the given image's rows kept
  images/NNNNN_DIGEST_K_xS.png  with an UPSAMPLER_DIR, sample K upsampled S times
                        (Parti's super-resolution stage); the manifest lists both
  images/NNNNN_DIGEST_{input,mask,decoded}.png  for an edit, the image as the
                        tokenizer reads it, the tokens redrawn (white), and the image
                        decoded from its own codes (what the kept tokens show)
  manifest-HHHHH.jsonl  one line per finished prompt, per host: the prompt, its
                        category and challenge, seed, sampling options, checkpoint
                        step, scores and file names
  index.html            the gallery (offline), rewritten as prompts finish
  timing-HHHHH.json     where this run's time went, per host: loading, the first
                        sampler call (compiling), the sampler after it, the rest
  report.md             per-category and per-challenge tables, for PartiPrompts-style prompts
  geneval/NNNNN/        for a GenEval metadata file as PROMPTS: GenEval's layout,
                        metadata.jsonl and samples/NNNN.png (the kept images), which
                        GenEval's scorer or parti.evaluate_geneval reads
  options.json          what the images were made with, and config.gin

A rerun skips the prompts whose manifest line and files exist, so a killed job
loses nothing it finished; a rerun with other options or another checkpoint is
refused rather than mixed in. Prompts are spread over every device and host
(each host feeds its slice of each batch); the last batch is padded. Each
prompt's seed is derived from its text, so its images do not depend on its
place in the list or in a batch. Requests from a .jsonl file may set their own
seed and guidance scale, and with `SamplingOptions.prefix_rows` > 0 each names an
image whose top rows, encoded by the tokenizer, the model continues downward
(image completion). A request with an image and a `mask`, `box` or `extend` is an
edit (`parti.sampling.editing`): only the tokens of that region are redrawn, and the
`samples` candidates are ranked by the likelihood of the whole sequence. Samples are ranked by a contrastive
reranker's image-prompt similarity when `reranker_dir` names a
`parti.train_contrastive` run (its CLIP-style score goes in the manifest and the
report), else by their log-likelihood under the guided model.

The model, tokenizer and this job run without TensorFlow (prompts from a seqio
task excepted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Sequence

import gin
import jax
import numpy as np
from absl import logging

from parti import partitioning
from parti.evaluation import gallery, geneval, prompt_report
from parti.modeling import checkpoint_io, contrastive
from parti.runtime import files, gin_utils, metric_logging
from parti.runtime import images as images_io
from parti.runtime.errors import ConfigError
from parti.sampling import editing, manifests
from parti.sampling.generation import (
  SamplingOptions,
  guidance_scale,
  host_inputs,
  load_tokenizer,
  make_generator,
  prompt_seed,
)
from parti.sampling.prompts import Prompt, PromptEncoder, read_prompts

OPTIONS_FILE = "options.json"
GALLERY = "index.html"
REPORT = "report.md"
GENEVAL_DIR = "geneval"


# --- Outputs --------------------------------------------------------------------------------------


def _check_options(output_dir: pathlib.Path, record: dict, has_images: bool) -> None:
  """Refuses options other than those the folder's finished images were made with. A
  folder without a finished image (a run that failed before its first) takes the new
  options."""
  path = output_dir / OPTIONS_FILE
  if path.is_file():
    previous = json.loads(path.read_text())
    if previous == record:
      return
    if has_images:
      changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
      raise ConfigError(
        f"{output_dir} holds images made with other {changed} ({previous}); write to "
        "another OUTPUT_DIR, or delete it to start over."
      )
    logging.info("%s holds no finished image yet: its options are replaced.", output_dir)
  if jax.process_index() == 0:
    files.atomic_write_json(path, record)


# --- The job --------------------------------------------------------------------------------------


def infer(
  *,
  checkpoint_dir: str,
  tokenizer_dir: str,
  prompts: str,
  output_dir: str,
  options: SamplingOptions = SamplingOptions(),
  batch_size: int = 8,
  checkpoint_step: int | None = None,
  vocabulary: str | None = None,
  mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
  gallery_every: int = 10,
  reranker_dir: str | None = None,
  image_root: str | None = None,
  upsampler_dir: str | None = None,
) -> list[dict]:
  """Generates images for every prompt; returns this run's manifest entries.

  Args:
    checkpoint_dir: a `parti.train` MODEL_DIR.
    tokenizer_dir: the image tokenizer's MODEL_DIR (whose codes the model writes).
    prompts: a .txt or PartiPrompts .tsv file, or `task:NAME[:SPLIT]`.
    output_dir: where images, manifests and the gallery go.
    options: sampling options.
    batch_size: prompts per step over all hosts (each drawn `options.samples` times).
    checkpoint_step: the step to load (default: the latest that restores).
    vocabulary: the SentencePiece model of the model's text (default: the shapes one).
    mesh: device mesh and logical-axis rules.
    gallery_every: batches between rewrites of the gallery.
    reranker_dir: a `parti.train_contrastive` MODEL_DIR whose model ranks the samples
      (None: rank by log-likelihood).
    image_root: a folder from which requests may also read images to complete
      (default: only their request file's folder).
    upsampler_dir: a `parti.train_upsampler` MODEL_DIR whose upsampler also writes each
      kept image at its larger size (None: tokenizer-size images only).
  """
  job_start = time.perf_counter()
  device_mesh = partitioning.create_mesh(mesh)
  rules = partitioning.rules_for(mesh)
  rows = batch_size * options.samples
  partitioning.check_batch_size(rows, device_mesh)
  if batch_size % jax.process_count():
    raise ConfigError(f"batch_size {batch_size} does not split over {jax.process_count()} hosts.")
  config, params, param_shardings, step = checkpoint_io.load_params(
    checkpoint_dir, device_mesh, rules, checkpoint_step
  )
  tok_config, tok_params, tok_step = load_tokenizer(tokenizer_dir, config, device_mesh)
  encoder = PromptEncoder(config.text_length, vocabulary)
  if encoder.vocab_size > config.text_vocab_size:
    raise ConfigError(
      f"The vocabulary {encoder.path} has {encoder.vocab_size} pieces; the model reads "
      f"{config.text_vocab_size}."
    )
  reranker = None
  if reranker_dir:
    from parti.sampling.rerank import Reranker

    reranker = Reranker.from_checkpoint(reranker_dir, vocabulary)
  upsampler = load_upsampler(upsampler_dir, tok_config)
  all_prompts = read_prompts(prompts, image_root)
  editing.check_method(options.edit_method, config, all_prompts, checkpoint_dir)
  out = pathlib.Path(output_dir)
  (out / "images").mkdir(parents=True, exist_ok=True)
  record = {
    **dataclasses.asdict(options),
    "checkpoint": str(pathlib.Path(checkpoint_dir).absolute()),
    "checkpoint_step": step,
    "tokenizer": str(pathlib.Path(tokenizer_dir).absolute()),
    "tokenizer_step": tok_step,
    "reranker": str(pathlib.Path(reranker_dir).absolute()) if reranker else None,
    "reranker_step": reranker.step if reranker else None,
    "upsampler": str(pathlib.Path(upsampler_dir).absolute()) if upsampler else None,
    "upsampler_step": upsampler.step if upsampler else None,
    # What edit_method "auto" came to with this model.
    "edits_made": "fine_tuned" if editing.fine_tuned(options.edit_method, config) else "zero_shot",
  }
  done = manifests.finished_prompts(out)
  _check_options(out, record, has_images=bool(done))
  gin_utils.write_operative_config(out if jax.process_index() == 0 else None)

  todo = [(i, p) for i, p in enumerate(all_prompts) if p.key not in done]
  logging.info(
    "%d prompts: %d already done in %s, %d to generate.",
    len(all_prompts), len(all_prompts) - len(todo), out, len(todo),
  )  # fmt: skip
  edits = edit_tokens(todo, options, tok_config, tok_params, out)
  prefixes = prefix_tokens(todo, options, tok_config, tok_params, out)
  per_request_scales = any(p.guidance_scale is not None for p in all_prompts)
  generate = make_generator(
    config, tok_config, options, device_mesh, rules, param_shardings, per_request_scales
  )
  manifest = out / f"manifest-{jax.process_index():05d}.jsonl"
  per_host = batch_size // jax.process_count()
  num_batches = -(-len(todo) // batch_size)
  progress = metric_logging.Progress(num_batches, unit="images", every=1)
  written: list[dict] = []
  for number in range(num_batches):
    batch = todo[number * batch_size : (number + 1) * batch_size]
    mine = batch[jax.process_index() * per_host : (jax.process_index() + 1) * per_host]
    inputs = host_inputs(mine or batch[-1:], per_host, encoder, options, prefixes, edits)
    images, log_likelihoods = generate(params, tok_params, *inputs)
    images, log_likelihoods = images[: len(mine)], log_likelihoods[: len(mine)]
    similarities = None
    if reranker and mine:
      flat = images.reshape(-1, *images.shape[2:])
      texts = [prompt for _, prompt in mine for _ in range(options.samples)]
      similarities = reranker.score(flat, texts).reshape(log_likelihoods.shape)
    scores = log_likelihoods if similarities is None else similarities
    best = np.argsort(-scores, axis=1, kind="stable")[:, : options.keep]
    large = None
    if upsampler is not None and mine:  # The kept images of the whole batch, in one call.
      kept = np.take_along_axis(images, best[..., None, None, None], axis=1)
      large = upsampler.upsample(kept.reshape(-1, *kept.shape[2:])).reshape(
        *best.shape, *((upsampler.config.output_size,) * 2), 3
      )
    for slot, (index, prompt) in enumerate(mine):
      entry = _write_prompt(
        out, index, prompt, images[slot], best[slot], log_likelihoods[slot],
        None if similarities is None else similarities[slot], options, step,
        None if large is None else large[slot], edits.get(index) if edits else None,
      )  # fmt: skip
      with open(manifest, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
      written.append(entry)
    progress.update(number + 1, len(batch) * options.samples)
    if (number + 1) % gallery_every == 0 or number + 1 == num_batches:
      _write_gallery(out, all_prompts, checkpoint_dir, step)
  if not num_batches:
    _write_gallery(out, all_prompts, checkpoint_dir, step)
  if jax.process_index() == 0 and geneval.is_metadata_file(prompts):
    _write_geneval_layout(out, prompts)  # After the gallery's barrier: every host is done.
  if generate.calls:
    timing = generate.timing(job_start, time.perf_counter())
    logging.info("Where the time went: %s", timing)
    files.atomic_write_json(out / f"timing-{jax.process_index():05d}.json", timing)
  return written


def _write_geneval_layout(out: pathlib.Path, metadata_file: str) -> None:
  """GenEval's folders (`geneval/<index>/metadata.jsonl`, `samples/NNNN.png`: each
  metadata line's kept images, best first) from the finished prompts, so that GenEval's
  own scorer, or `parti.evaluate_geneval`, reads this run's images."""
  lines = geneval.read_metadata(metadata_file)
  done = manifests.finished_prompts(out)
  images = []
  for line in lines:
    entry = done.get(" ".join(line["prompt"].split()))
    images.append([out / name for name in entry["files"]] if entry else [])
  written = geneval.write_layout(out / GENEVAL_DIR, lines, images)
  logging.info(
    "GenEval layout: %d images of %d prompts in %s.", written, len(lines), out / GENEVAL_DIR
  )


def load_upsampler(upsampler_dir: str | None, tok_config):
  """The super-resolution stage of `upsampler_dir`, or None without one.

  Raises:
    ConfigError: no trained upsampler there, or one whose input size is not the
      tokenizer's image size (it would upsample images it was not trained on).
  """
  if not upsampler_dir:
    return None
  from parti.upsampling.api import Upsampler

  # On one of this host's devices, like the tokenizer for prefixes and edits: each host
  # upsamples its own prompts' images (the job's mesh spans every host's devices).
  upsampler = Upsampler.from_checkpoint(upsampler_dir)
  if upsampler.config.input_size != tok_config.image_size:
    raise ConfigError(
      f"The upsampler in {upsampler_dir} takes {upsampler.config.input_size} px images, but "
      f"the tokenizer makes {tok_config.image_size} px ones: train one for this tokenizer."
    )
  return upsampler


def edit_tokens(todo, options: SamplingOptions, tok_config, tok_params, out) -> dict | None:
  """Editing: prompt index -> its `editing.Edit` (the image's codes and which to redraw),
  for the requests that name a region; None when there are none.

  Every image and mask is read and checked before anything is generated, so a bad
  request is refused up front, named. The input, the redrawn tokens' mask and the input
  decoded from its own codes go to images/ for the gallery.

  Raises:
    ConfigError: a bad request (see `editing.prepare`), or edits asked together with
      image completion or speculative Jacobi decoding.
  """
  requests = [(index, p) for index, p in todo if editing.is_edit(p)]
  if not requests:
    return None
  if options.prefix_rows or options.jacobi_window:
    raise ConfigError(
      f"{requests[0][1].source} is an edit; edits run with prefix_rows and jacobi_window 0 "
      f"(they are {options.prefix_rows} and {options.jacobi_window})."
    )
  from parti.tokenizer.api import ImageTokenizer

  tokenizer = ImageTokenizer(tok_config, tok_params)  # On one of this host's devices.
  edits = {
    index: editing.prepare(prompt, tok_config, tokenizer.encode) for index, prompt in requests
  }
  if jax.process_index() == 0:
    for index, prompt in requests:
      edit = edits[index]
      stem = _file_stem(index, prompt)
      decoded = tokenizer.decode(edit.tokens.reshape(1, *tok_config.grid))[0]
      for suffix, image in (
        ("input", edit.image.astype(np.float32) / 255.0),
        ("mask", np.repeat(edit.token_mask_image[..., None], 3, axis=-1).astype(np.float32)),
        ("decoded", decoded),
      ):
        files.atomic_write_bytes(out / f"{stem}_{suffix}.png", images_io.png_bytes(image))
  return edits


def prefix_tokens(
  todo: Sequence[tuple[int, Prompt]], options: SamplingOptions, tok_config, tok_params, out
) -> dict[int, np.ndarray] | None:
  """Image completion: prompt index -> the top `prefix_rows` rows of its image's codes.

  Each image is read, resized and center-cropped to the tokenizer's size, encoded,
  and its kept rows written (over a faded rest) to images/NNNNN_DIGEST_prefix.png for the
  gallery. Every image is read before anything is generated, so a missing or
  unreadable one is refused up front, named, rather than hours into a run.
  """
  with_image = [p for _, p in todo if p.image and not editing.is_edit(p)]
  if not options.prefix_rows:
    if with_image:
      raise ConfigError(
        f"{with_image[0].source} names an image to complete, but SamplingOptions.prefix_rows "
        "is 0: set it to the rows of each image to keep."
      )
    return None
  if tok_config.group_layout == "stacked" and tok_config.codebook_groups > 1:
    raise ConfigError(
      "SamplingOptions.prefix_rows keeps an image's top token rows, but this tokenizer "
      "stacks its product codes group by group (group_layout 'stacked'), so its top rows are "
      "one group's codes of the whole image: set prefix_rows to 0, or edit the image instead."
    )
  rows = tok_config.grid[0]
  if options.prefix_rows >= rows:
    raise ConfigError(f"prefix_rows {options.prefix_rows} leaves nothing of a {rows}-row grid.")
  missing = [p.source for _, p in todo if not p.image]
  if missing:
    raise ConfigError(
      f"With prefix_rows set, every request needs an 'image' (a .jsonl request file); "
      f"{len(missing)} have none, first {missing[:3]}."
    )
  from parti.tasks import records
  from parti.tokenizer.api import ImageTokenizer

  images, bad = {}, []
  for index, prompt in todo:
    path = pathlib.Path(prompt.image)
    try:
      image = records.decode_image(records.read_image_file(path))
      images[index] = records.resize_and_crop(image, tok_config.image_size)
    except (OSError, records.BadRecord) as error:
      bad.append(f"{path} ({prompt.source}): {error}")
  if bad:
    raise ConfigError(f"{len(bad)} images to complete cannot be read: " + "; ".join(bad[:5]))
  tokenizer = ImageTokenizer(tok_config, tok_params)  # On one of this host's devices.
  known = options.prefix_rows * tok_config.grid[1]
  kept_pixels = options.prefix_rows * tok_config.patch_size
  prefixes, requests = {}, dict(todo)
  for index, image in images.items():
    prefixes[index] = tokenizer.encode(image[None])[0].reshape(-1)[:known]
    if jax.process_index() == 0:
      shown = image.astype(np.float32) / 255.0
      shown[kept_pixels:] = 0.75 + 0.25 * shown[kept_pixels:]  # The rows to generate, faded.
      name = f"{_file_stem(index, requests[index])}_prefix.png"
      files.atomic_write_bytes(out / name, images_io.png_bytes(shown))
  return prefixes


def _file_stem(index: int, prompt: Prompt) -> str:
  """images/NNNNN_DIGEST: the request's place in the list, for sorting, and a digest of
  the request itself, so that a request never writes over another's files, even when
  the list changes between runs into one folder."""
  digest = hashlib.sha1(prompt.key.encode("utf-8")).hexdigest()[:10]
  return f"images/{index:05d}_{digest}"


def _write_prompt(
  out,
  index,
  prompt,
  images,
  best,
  log_likelihoods,
  similarities,
  options,
  step,
  upsampled=None,
  edit=None,
):
  """Writes a prompt's best `keep` images (indices `best`, ranked), and their upsampled
  versions when given; returns its manifest entry.

  `scores` are what ranked the samples: the reranker's cosine similarities when
  there is one (with their CLIP-score), else the log-likelihoods.
  """
  scores = log_likelihoods if similarities is None else similarities
  names = []
  for rank, sample in enumerate(best):
    name = f"{_file_stem(index, prompt)}_{rank}.png"
    files.atomic_write_bytes(out / name, images_io.png_bytes(images[sample]))
    names.append(name)
  large = {}
  if upsampled is not None:
    scale = upsampled.shape[1] // images.shape[1]
    large = {"upsampler_scale": scale, "upsampled_files": []}
    for rank, image in enumerate(upsampled):
      name = f"{_file_stem(index, prompt)}_{rank}_x{scale}.png"
      files.atomic_write_bytes(out / name, images_io.png_bytes(image))
      large["upsampled_files"].append(name)
  return {
    "index": index,
    "prompt": prompt.text,
    "request": prompt.key,
    "category": prompt.category,
    "challenge": prompt.challenge,
    "source": prompt.source,
    "seed": prompt_seed(options.seed, prompt),
    "samples": [int(s) for s in best],
    "guidance_scale": guidance_scale(options, prompt),
    **{k: getattr(options, k) for k in ("temperature", "top_k", "top_p", "plausibility")},
    **(
      {
        "image": prompt.image,
        "prefix_rows": options.prefix_rows,
        "prefix_file": f"{_file_stem(index, prompt)}_prefix.png",
      }
      if prompt.image and not edit
      else {}
    ),
    **(
      {
        "edit": {
          "image": prompt.image,
          **{
            k: (list(v) if isinstance(v, tuple) else v)
            for k in ("mask", "box", "extend")
            if (v := getattr(prompt, k))
          },
          "redrawn_tokens": int(edit.redraw.sum()),
          "kept_tokens": int((~edit.redraw).sum()),
          "input_file": f"{_file_stem(index, prompt)}_input.png",
          "mask_file": f"{_file_stem(index, prompt)}_mask.png",
          "decoded_input_file": f"{_file_stem(index, prompt)}_decoded.png",
        }
      }
      if edit
      else {}
    ),
    "checkpoint_step": step,
    "scores": [float(scores[s]) for s in best],
    "score": "log_likelihood" if similarities is None else "reranker_cosine",
    "log_likelihoods": [float(log_likelihoods[s]) for s in best],
    **(
      {}
      if similarities is None
      else {"clip_score": float(contrastive.clip_score(similarities[best[0]]))}
    ),
    "files": names,
    **large,
  }


def _write_gallery(out: pathlib.Path, prompts: Sequence[Prompt], checkpoint_dir, step) -> None:
  from jax.experimental import multihost_utils

  multihost_utils.sync_global_devices("parti_infer_gallery")
  if jax.process_index() != 0:
    return
  done = manifests.finished_prompts(out)
  entries = sorted(done.values(), key=lambda e: e["index"])
  if any(e.get("category") or e.get("challenge") for e in entries):
    files.atomic_write_text(out / REPORT, prompt_report.markdown(entries, "Parti samples"))
  gallery.write_gallery(
    out / GALLERY,
    "Parti samples",
    entries,
    subtitle=f"{len(entries)} of {len(prompts)} prompts · {checkpoint_dir} step {step} · "
    f"{time.strftime('%Y-%m-%d %H:%M')}",
  )


configured_infer = gin.external_configurable(infer)
gin.external_configurable(SamplingOptions, module="infer")

if __name__ == "__main__":
  gin_utils.run(configured_infer)
