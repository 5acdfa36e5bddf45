"""Batch inference: prompts in; images, a manifest and a gallery out (t5x-style job).

    python -m parti.infer --gin_file=gin/runs/infer.gin --gin.CHECKPOINT_DIR=runs/parti \
      --gin.TOKENIZER_DIR=runs/tokenizer --gin.PROMPTS=prompts.txt --gin.OUTPUT_DIR=runs/infer

OUTPUT_DIR receives, per prompt (numbered by its place in the prompt list):

  images/NNNNN_K.png    its K best samples of `samples` drawn, written atomically
  images/NNNNN_prefix.png  for image completion, the given image's rows that were kept
  manifest-HHHHH.jsonl  one line per finished prompt, per host: the prompt, its
                        category and challenge, seed, sampling options, checkpoint
                        step, scores and file names
  index.html            the gallery (offline), rewritten as prompts finish
  report.md             per-category and per-challenge tables, for PartiPrompts-style prompts
  options.json          what the images were made with, and config.gin

A rerun skips the prompts whose manifest line and files exist, so a killed job
loses nothing it finished; a rerun with other options or another checkpoint is
refused rather than mixed in. Prompts are spread over every device and host
(each host feeds its slice of each batch); the last batch is padded. Each
prompt's seed is derived from its text, so its images do not depend on its
place in the list or in a batch. Requests from a .jsonl file may set their own
seed and guidance scale, and with `SamplingOptions.prefix_rows` > 0 each names an
image whose top rows, encoded by the tokenizer, the model continues downward
(image completion). Samples are ranked by a contrastive
reranker's image-prompt similarity when `reranker_dir` names a
`parti.train_contrastive` run (its CLIP-style score goes in the manifest and the
report), else by their log-likelihood under the guided model.

The model, tokenizer and this job run without TensorFlow (prompts from a seqio
task excepted).
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import time
import zlib
from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn
from PIL import Image

from parti import (
  checkpoints,
  contrastive,
  decoding,
  files,
  gallery,
  gin_utils,
  metric_logging,
  partitioning,
  prompt_report,
)
from parti.config import PartiConfig
from parti.errors import ConfigError
from parti.model import Parti
from parti.prompts import Prompt, PromptEncoder, read_prompts

OPTIONS_FILE = "options.json"
GALLERY = "index.html"
REPORT = "report.md"


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How each prompt is sampled.

  Attributes:
    guidance_scale: classifier-free guidance (Parti: 1.2 for its best FID); 1.0 is off.
    temperature: sampling temperature (0: greedy).
    top_k: sample among the k likeliest codes (0: all).
    top_p: sample among the likeliest codes holding this mass (1.0: all).
    samples: images drawn per prompt.
    keep: the best of them kept (by score).
    seed: the run's seed; a request's is derived from it and the request's text, unless
      the request sets its own.
    prefix_rows: image completion: rows of each request's image (in tokenizer grid
      rows) kept as they are and continued downward (0: generate whole images).
  """

  guidance_scale: float = 1.2
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  samples: int = 1
  keep: int = 1
  seed: int = 0
  prefix_rows: int = 0

  def __post_init__(self):
    if not 1 <= self.keep <= self.samples:
      raise ConfigError(f"Keep 1 to `samples` ({self.samples}) images per prompt, not {self.keep}.")
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.prefix_rows < 0:
      raise ConfigError(f"Bad sampling options: {self}.")


def prompt_seed(seed: int, prompt: Prompt) -> int:
  """A request's seed: its own, else a stable hash of the run's seed and its text."""
  if prompt.seed is not None:
    return prompt.seed
  return zlib.crc32(f"{seed}:{prompt.text}".encode()) & 0x7FFFFFFF


def guidance_scale(options: SamplingOptions, prompt: Prompt) -> float:
  """A request's guidance scale: its own, else the run's."""
  return options.guidance_scale if prompt.guidance_scale is None else prompt.guidance_scale


# --- Loading --------------------------------------------------------------------------------------


def load_model(checkpoint_dir: str, mesh, rules, step: int | None = None):
  """(config, sharded parameters, step) of a Parti training run's checkpoint."""
  folder = pathlib.Path(checkpoint_dir)
  config_path = folder / "parti_config.json"
  if not config_path.is_file():
    raise ConfigError(f"{checkpoint_dir} is not a Parti run: {config_path} is missing.")
  config = PartiConfig.load(config_path)
  model = Parti(config)
  boxed = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0),
      jnp.ones((1, config.text_length), jnp.int32),
      jnp.zeros((1, config.image_length), jnp.int32),
    )["params"]
  )
  shardings = partitioning.tree_shardings(mesh, boxed, rules)
  abstract = partitioning.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
  try:
    found, params = checkpoints.restore_params(folder, abstract, step)
  except FileNotFoundError as error:
    raise ConfigError(str(error)) from error
  return config, params, shardings, found


def load_tokenizer(tokenizer_dir: str, config: PartiConfig, mesh):
  """(tokenizer config, replicated parameters, step), checked against the model's codes."""
  from parti.tokenizer import checkpoint_io

  tok_config, params, step = checkpoint_io.load_for_model(tokenizer_dir, config)
  return tok_config, partitioning.replicate(params, mesh), step


# --- Outputs --------------------------------------------------------------------------------------


def finished_prompts(output_dir: pathlib.Path) -> dict[str, dict]:
  """request key (`Prompt.key`) -> its manifest entry, for requests whose files all exist
  (any host's)."""
  done = {}
  for manifest in sorted(output_dir.glob("manifest-*.jsonl")):
    for line in manifest.read_text(encoding="utf-8").splitlines():
      try:
        entry = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line torn by a kill: that prompt is generated again.
      if all((output_dir / name).is_file() for name in entry.get("files", [])):
        done[entry.get("request", entry["prompt"])] = entry
  return done


def _check_options(output_dir: pathlib.Path, record: dict) -> None:
  path = output_dir / OPTIONS_FILE
  if path.is_file():
    previous = json.loads(path.read_text())
    if previous != record:
      changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
      raise ConfigError(
        f"{output_dir} holds images made with other {changed} ({previous}); write to "
        "another OUTPUT_DIR, or delete it to start over."
      )
  elif jax.process_index() == 0:
    files.atomic_write_json(path, record)


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  pixels = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


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
  """
  device_mesh = partitioning.create_mesh(mesh)
  rules = partitioning.rules_for(mesh)
  rows = batch_size * options.samples
  partitioning.check_batch_size(rows, device_mesh)
  if batch_size % jax.process_count():
    raise ConfigError(f"batch_size {batch_size} does not split over {jax.process_count()} hosts.")
  config, params, param_shardings, step = load_model(
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
    from parti.rerank import Reranker

    reranker = Reranker.from_checkpoint(reranker_dir, vocabulary)
  all_prompts = read_prompts(prompts)
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
  }
  _check_options(out, record)
  gin_utils.write_operative_config(out if jax.process_index() == 0 else None)

  done = finished_prompts(out)
  todo = [(i, p) for i, p in enumerate(all_prompts) if p.key not in done]
  logging.info(
    "%d prompts: %d already done in %s, %d to generate.",
    len(all_prompts), len(all_prompts) - len(todo), out, len(todo),
  )  # fmt: skip
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
    inputs = host_inputs(mine or batch[-1:], per_host, encoder, options, prefixes)
    images, log_likelihoods = generate(params, tok_params, *inputs)
    images, log_likelihoods = images[: len(mine)], log_likelihoods[: len(mine)]
    similarities = None
    if reranker and mine:
      flat = images.reshape(-1, *images.shape[2:])
      texts = [prompt for _, prompt in mine for _ in range(options.samples)]
      similarities = reranker.score(flat, texts).reshape(log_likelihoods.shape)
    for slot, (index, prompt) in enumerate(mine):
      entry = _write_prompt(
        out, index, prompt, images[slot], log_likelihoods[slot],
        None if similarities is None else similarities[slot], options, step,
      )  # fmt: skip
      with open(manifest, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
      written.append(entry)
    progress.update(number + 1, len(batch) * options.samples)
    if (number + 1) % gallery_every == 0 or number + 1 == num_batches:
      _write_gallery(out, all_prompts, checkpoint_dir, step)
  if not num_batches:
    _write_gallery(out, all_prompts, checkpoint_dir, step)
  return written


def prefix_tokens(
  todo: Sequence[tuple[int, Prompt]], options: SamplingOptions, tok_config, tok_params, out
) -> dict[int, np.ndarray] | None:
  """Image completion: prompt index -> the top `prefix_rows` rows of its image's codes.

  Each image is read, resized and center-cropped to the tokenizer's size, encoded,
  and its kept rows written (over a faded rest) to images/NNNNN_prefix.png for the
  gallery. Every image is read before anything is generated, so a missing or
  unreadable one is refused up front, named, rather than hours into a run.
  """
  with_image = [p for _, p in todo if p.image]
  if not options.prefix_rows:
    if with_image:
      raise ConfigError(
        f"{with_image[0].source} names an image to complete, but SamplingOptions.prefix_rows "
        "is 0: set it to the rows of each image to keep."
      )
    return None
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
      image = records.decode_image(path.read_bytes())
      images[index] = records.resize_and_crop(image, tok_config.image_size)
    except (OSError, records.BadRecord) as error:
      bad.append(f"{path} ({prompt.source}): {error}")
  if bad:
    raise ConfigError(f"{len(bad)} images to complete cannot be read: " + "; ".join(bad[:5]))
  tokenizer = ImageTokenizer(tok_config, tok_params)  # On one of this host's devices.
  known = options.prefix_rows * tok_config.grid[1]
  kept_pixels = options.prefix_rows * tok_config.patch_size
  prefixes = {}
  for index, image in images.items():
    prefixes[index] = tokenizer.encode(image[None])[0].reshape(-1)[:known]
    if jax.process_index() == 0:
      shown = image.astype(np.float32) / 255.0
      shown[kept_pixels:] = 0.75 + 0.25 * shown[kept_pixels:]  # The rows to generate, faded.
      files.atomic_write_bytes(out / _prefix_name(index), _png(shown))
  return prefixes


def _prefix_name(index: int) -> str:
  return f"images/{index:05d}_prefix.png"


def host_inputs(
  mine: Sequence[tuple[int, Prompt]],
  per_host: int,
  encoder,
  options: SamplingOptions,
  prefixes: dict[int, np.ndarray] | None = None,
):
  """This host's rows (per_host * samples): text [rows, T], seeds [rows, 2], guidance
  scales [rows] and image prefixes [rows, k] (k = 0 without completion). Padding rows
  repeat the last prompt (their outputs are dropped); a host with no prompt left in
  the last batch is given one of another host's, to pad with."""
  padded = list(mine) + [mine[-1]] * (per_host - len(mine))
  rows = [(index, p, sample) for index, p in padded for sample in range(options.samples)]
  text = np.stack([encoder.encode(p) for _, p, _ in rows])
  seeds = np.array([(prompt_seed(options.seed, p), sample) for _, p, sample in rows], np.int32)
  scales = np.array([guidance_scale(options, p) for _, p, _ in rows], np.float32)
  prefix = (
    np.stack([prefixes[index] for index, _, _ in rows]).astype(np.int32)
    if prefixes
    else np.zeros((len(rows), 0), np.int32)
  )
  return text, seeds, scales, prefix


def make_generator(
  config,
  tok_config,
  options: SamplingOptions,
  mesh,
  rules,
  param_shardings,
  per_request_scales: bool = False,
):
  """The jitted sampler and tokenizer decoder, shared by inference and evaluation.

  Returns a function of (params, tokenizer params, and `host_inputs`' arrays) ->
  this host's (images [prompts, samples, H, W, 3], scores [prompts, samples]) as
  numpy. Guidance uses the run's scale (1.0 skips the unconditional stream) unless
  `per_request_scales`, when each row's own scale is used."""
  from jax.experimental import multihost_utils

  from parti.tokenizer import model as tokenizer_model

  vqgan = tokenizer_model.VitVQGAN(tok_config)
  batch_spec = partitioning.logical_to_spec(("batch",), rules)
  rows_sharding = jax.sharding.NamedSharding(mesh, batch_spec)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def generate(params, tok_params, text, seeds, scales, prefix):
    keys = jax.vmap(
      lambda s: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), s[0]), s[1])
    )(seeds)
    tokens, log_probs = decoding.sample(
      config, params, text, keys, temperature=options.temperature, top_k=options.top_k,
      top_p=options.top_p, guidance_scale=scales if per_request_scales else options.guidance_scale,
      prefix=prefix if prefix.shape[1] else None,
    )  # fmt: skip
    ids = tokens.reshape(-1, *config.image_grid)
    images = vqgan.apply({"params": tok_params}, ids, method=tokenizer_model.VitVQGAN.decode)
    return images, jnp.sum(log_probs, axis=-1)

  jitted = jax.jit(
    generate,
    in_shardings=(param_shardings, replicated, *[rows_sharding] * 4),
    out_shardings=(rows_sharding, rows_sharding),
  )

  def run(params, tok_params, *host_arrays):
    global_arrays = [jax.make_array_from_process_local_data(rows_sharding, x) for x in host_arrays]
    with partitioning.activate(mesh, rules):
      images, scores = jitted(params, tok_params, *global_arrays)
    images, scores = multihost_utils.global_array_to_host_local_array(
      (images, scores), mesh, (batch_spec, batch_spec)
    )
    images = np.asarray(images, np.float32)
    shape = (-1, options.samples)
    return images.reshape(*shape, *images.shape[1:]), np.asarray(scores).reshape(shape)

  return run


def _write_prompt(out, index, prompt, images, log_likelihoods, similarities, options, step):
  """Writes a prompt's best `keep` images; returns its manifest entry.

  `scores` are what ranked the samples: the reranker's cosine similarities when
  there is one (with their CLIP-score), else the log-likelihoods.
  """
  scores = log_likelihoods if similarities is None else similarities
  best = np.argsort(-scores, kind="stable")[: options.keep]
  names = []
  for rank, sample in enumerate(best):
    name = f"images/{index:05d}_{rank}.png"
    files.atomic_write_bytes(out / name, _png(images[sample]))
    names.append(name)
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
    **{k: getattr(options, k) for k in ("temperature", "top_k", "top_p")},
    **(
      {
        "image": prompt.image,
        "prefix_rows": options.prefix_rows,
        "prefix_file": _prefix_name(index),
      }
      if prompt.image
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
  }


def _write_gallery(out: pathlib.Path, prompts: Sequence[Prompt], checkpoint_dir, step) -> None:
  from jax.experimental import multihost_utils

  multihost_utils.sync_global_devices("parti_infer_gallery")
  if jax.process_index() != 0:
    return
  done = finished_prompts(out)
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
