"""Generating images from prompts: sampling options, each request's seed and guidance
scale, this host's slice of a batch, and the jitted sampler that turns prompts into
decoded images.

Inference, evaluation and the benches generate through here; `parti.modeling.
checkpoint_io` loads the model they sample.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from parti import partitioning
from parti.runtime.errors import ConfigError
from parti.runtime.validation import check_types
from parti.sampling import decoding, editing, jacobi
from parti.sampling.prompts import Prompt


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How each prompt is sampled.

  Attributes:
    guidance_scale: classifier-free guidance (Parti: 1.2 for its best FID); 1.0 is off.
    temperature: sampling temperature (0: greedy).
    top_k: sample among the k likeliest codes (0: all).
    top_p: sample among the likeliest codes holding this mass (1.0: all).
    plausibility: sample only among the codes the conditional model gives at least
      this fraction of its likeliest code's probability (0.0: all). It keeps guidance
      from promoting codes the prompt makes no likelier to appear, only less unlikely
      (`decoding.Guidance`); on the shapes demo, 0.3 lifts test prompts from 74% to
      83% right at λ = 1, and holds them there at λ = 3 where they fell to 20%.
    samples: images drawn per prompt.
    keep: the best of them kept (by score).
    seed: the run's seed; a request's is derived from it and the request's text, unless
      the request sets its own.
    prefix_rows: image completion: rows of each request's image (in tokenizer grid
      rows) kept as they are and continued downward (0: generate whole images).
    jacobi_window: draft tokens per decoder call with speculative Jacobi decoding
      (`parti.sampling.jacobi`: the same distribution in fewer calls); 0 is the
      standard sampler, one token per call.
    edit_sweeps: for edits, passes of `editing.refine` over each sample's redrawn
      tokens (each set to the code that makes the whole sequence likeliest); 0 keeps
      the samples as drawn.
    edit_method: "fine_tuned" (the editing head reads the image, `PartiConfig.
      edit_context`), "zero_shot" (the text-to-image model as trained), or "auto":
      fine-tuned when the model has the head.
  """

  guidance_scale: float = 1.2
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  plausibility: float = 0.0
  samples: int = 1
  keep: int = 1
  seed: int = 0
  prefix_rows: int = 0
  jacobi_window: int = 0
  edit_sweeps: int = 1
  edit_method: str = "auto"

  def __post_init__(self):
    check_types(self)
    if self.edit_method not in editing.METHODS:
      raise ConfigError(f"edit_method is {self.edit_method!r}; expected one of {editing.METHODS}.")
    if not 1 <= self.keep <= self.samples:
      raise ConfigError(f"Keep 1 to `samples` ({self.samples}) images per prompt, not {self.keep}.")
    if (
      self.temperature < 0
      or self.top_k < 0
      or not 0 < self.top_p <= 1
      or not 0 <= self.plausibility < 1
      or self.prefix_rows < 0
      or self.jacobi_window < 0
      or self.edit_sweeps < 0
    ):
      raise ConfigError(f"Bad sampling options: {self}.")


def prompt_seed(seed: int, prompt: Prompt) -> int:
  """A request's seed: its own, else a stable hash of the run's seed and its text."""
  if prompt.seed is not None:
    return prompt.seed
  return zlib.crc32(f"{seed}:{prompt.text}".encode()) & 0x7FFFFFFF


def guidance_scale(options: SamplingOptions, prompt: Prompt) -> float:
  """A request's guidance scale: its own, else the run's."""
  return options.guidance_scale if prompt.guidance_scale is None else prompt.guidance_scale


def load_tokenizer(tokenizer_dir: str, config, mesh):
  """(tokenizer config, replicated parameters, step), checked against the model's codes."""
  from parti.tokenizer import checkpoint_io

  tok_config, params, step = checkpoint_io.load_for_model(tokenizer_dir, config)
  return tok_config, partitioning.replicate(params, mesh), step


def host_inputs(
  mine: Sequence[tuple[int, Prompt]],
  per_host: int,
  encoder,
  options: SamplingOptions,
  prefixes: dict[int, np.ndarray] | None = None,
  edits: dict | None = None,
):
  """This host's rows (per_host * samples): text [rows, T], seeds [rows, 2], guidance
  scales [rows], image prefixes [rows, k] (k = 0 without completion), and for editing
  each row's image tokens and which of them to keep [rows, N] (N = 0 without edits;
  a prompt that is not an edit keeps none). Padding rows repeat the last prompt (their
  outputs are dropped); a host with no prompt left in the last batch is given one of
  another host's, to pad with."""
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
  kept = np.zeros((len(rows), 0), np.int32)
  keep = np.zeros((len(rows), 0), bool)
  if edits:
    length = len(next(iter(edits.values())).tokens)
    kept = np.zeros((len(rows), length), np.int32)
    keep = np.zeros((len(rows), length), bool)
    for row, (index, _, _) in enumerate(rows):
      if index in edits:
        kept[row], keep[row] = edits[index].tokens, ~edits[index].redraw
  return text, seeds, scales, prefix, kept, keep


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

  Returns a `Generator`: a function of (params, tokenizer params, and `host_inputs`'
  arrays) -> this host's (images [prompts, samples, H, W, 3], scores [prompts,
  samples]) as numpy, which records when each call started and ended. Guidance uses the run's scale (1.0 skips the unconditional stream) unless
  `per_request_scales`, when each row's own scale is used."""
  from jax.experimental import multihost_utils

  from parti.tokenizer import model as tokenizer_model

  vqgan = tokenizer_model.VitVQGAN(tok_config)
  batch_spec = partitioning.logical_to_spec(("batch",), rules)
  rows_sharding = jax.sharding.NamedSharding(mesh, batch_spec)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def generate(params, tok_params, text, seeds, scales, prefix, kept, keep):
    keys = jax.vmap(
      lambda s: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), s[0]), s[1])
    )(seeds)
    sampling = dict(
      temperature=options.temperature, top_k=options.top_k, top_p=options.top_p,
      plausibility=options.plausibility, guidance_scale=scales if per_request_scales else options.guidance_scale,
      prefix=prefix if prefix.shape[1] else None,
    )  # fmt: skip
    if keep.shape[1]:
      if options.jacobi_window:
        raise ConfigError("Edits decode with the standard sampler: set jacobi_window to 0.")
      # Fine-tuned: the head reads each image, its redrawn tokens masked (a plain prompt
      # in the batch keeps nothing, so it reads an all-masked image: plain generation).
      context = None
      if editing.fine_tuned(options.edit_method, config):
        context = jnp.where(keep, kept, config.mask_id)
      tokens, log_probs = decoding.sample(
        config, params, text, keys, keep=(kept, keep), edit_context=context, **sampling
      )
      if options.edit_sweeps:
        # Rows that keep nothing are plain prompts in an edit batch: left as sampled.
        redraw = ~keep & keep.any(axis=1, keepdims=True)
        tokens, likelihood = editing.refine(
          config, params, text, tokens, redraw, guidance_scale=sampling["guidance_scale"],
          top_k=options.top_k, sweeps=options.edit_sweeps, context=context,
        )  # fmt: skip
        log_probs = likelihood[:, None]  # The whole sequence's: all the ranking needs.
    elif options.jacobi_window:
      tokens, log_probs, _ = jacobi.sample(
        config, params, text, keys, window=options.jacobi_window, **sampling
      )
    else:
      tokens, log_probs = decoding.sample(config, params, text, keys, **sampling)
    ids = tokens.reshape(-1, *config.image_grid)
    images = vqgan.apply({"params": tok_params}, ids, method=tokenizer_model.VitVQGAN.decode)
    return images, jnp.sum(log_probs, axis=-1)

  jitted = jax.jit(
    generate,
    in_shardings=(param_shardings, replicated, *[rows_sharding] * 6),
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

  return Generator(run)


class Generator:
  """A generating function that records the (start, end) of each call, so that a job
  can say where its time went: the first call compiles, the rest sample."""

  def __init__(self, generate):
    self._generate = generate
    self.calls: list[tuple[float, float]] = []

  def __call__(self, *args):
    start = time.perf_counter()
    result = self._generate(*args)  # Returns numpy: the device work is done.
    self.calls.append((start, time.perf_counter()))
    return result

  def timing(self, job_start: float, job_end: float) -> dict[str, float]:
    """Where a job's seconds went: loading before the first call, that call (which
    compiles), the sampler's calls after it, and the job's whole time after it."""
    (first_start, first_end), rest = self.calls[0], self.calls[1:]
    return {
      "loading_seconds": first_start - job_start,
      "first_call_seconds": first_end - first_start,
      "sampler_seconds_after_first_call": sum(end - begin for begin, end in rest),
      "seconds_after_first_call": job_end - first_end,
      "calls": len(self.calls),
    }
