"""What one decoder call costs as its window grows: why Jacobi decoding's calls are dear on CPU.

python bench/jacobi_call_cost.py [--checkpoint_dir=runs/palette/parti] [--windows=1,4,8,16]

A Jacobi call (`parti.sampling.jacobi`) feeds a window of W positions per example to the
decoder where the standard sampler feeds one. The speed-up at batch 1 is the call count's
ratio divided by the call cost's ratio, so this prints, per window:

- the decoder call alone (the cache rewound each call, as Jacobi rewinds it), in a loop of
  calls in one jitted program, so that dispatch is not counted;
- the rate of the decoder's MLP matmuls at the same number of rows (2W with guidance),
  against the square-matmul peak (`bench/matmul_peak.py`): the share of the peak that a
  call's largest matmuls reach at the row counts decoding gives them.

Without --checkpoint_dir the model is the Jacobi benches' random one at a 16x16 grid (the
trained model's shapes, `jacobi_models.RANDOM`).
"""

import jacobi_models
import jax
import jax.numpy as jnp
import numpy as np
import timing
from absl import app, flags

from parti.modeling import flops
from parti.modeling.config import PartiConfig
from parti.modeling.model import Parti, unstack_layers
from parti.sampling import decoding, jacobi

_CHECKPOINT = flags.DEFINE_string("checkpoint_dir", None, "A trained parti.train run.")
_WINDOWS = flags.DEFINE_list("windows", ["1", "4", "8", "16"], "Positions fed per call.")
_CALLS = flags.DEFINE_integer("calls", 60, "Decoder calls per timed program.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed programs per window (the fastest counts).")


def decoder_call_seconds(config: PartiConfig, params, window: int, calls: int) -> float:
  """Seconds per decoder call feeding `window` positions at batch 1 with guidance."""
  # As jacobi.sample runs its calls: layers unstacked, key caches transposed.
  params, config = unstack_layers(params, config)
  config = config.replace(transposed_key_cache=True)
  parti = Parti(config)
  text = jnp.asarray(np.random.default_rng(0).integers(2, 40, (1, config.text_length)), jnp.int32)
  guidance = decoding.Guidance(2.0, 1, 0.0)

  def prefill(params, text):
    mask, _, _, _, cache = decoding.prefill_cache(parti, params, guidance, text, None)
    cache = decoding.resize_self_cache(cache, config.image_length + window, keys_transposed=True)
    return mask, cache

  def run(params, mask, cache):
    def call(i, state):
      cache, total = state
      inputs = jnp.full((1, window), i % 7, jnp.int32)
      logits, updated = parti.apply(
        {"params": params, "cache": cache}, guidance.doubled(inputs), None, mask,
        use_cache=True, method=Parti.decode, mutable=["cache"],
      )  # fmt: skip
      # Rewound to a position that moves, as a Jacobi call's commit moves it.
      position = 1 + (i * 3) % (config.image_length - window)
      return jacobi._set_write_position(updated["cache"], position), total + logits[0, -1, 0]

    return jax.lax.fori_loop(0, calls, call, (cache, jnp.float32(0)))[1]

  mask, cache = jax.jit(prefill)(params, text)
  return timing.best_time(jax.jit(run), params, mask, cache, repeats=_REPEATS.value) / calls


def mlp_matmul_flops_per_second(config: PartiConfig, rows: int, repeats: int = 200) -> float:
  """The rate of the decoder's MLP matmuls ([rows, embed] x [embed, mlp] and back)."""
  keys = jax.random.split(jax.random.key(0), 2)
  wi = jax.random.normal(keys[0], (config.embed_dim, config.mlp_dim)) * 0.05
  wo = jax.random.normal(keys[1], (config.mlp_dim, config.embed_dim)) * 0.05

  def run(x, wi, wo):
    return jax.lax.fori_loop(0, repeats, lambda _, x: jnp.tanh((x @ wi) @ wo), x)

  x = jnp.ones((rows, config.embed_dim))
  seconds = timing.best_time(jax.jit(run), x, wi, wo, repeats=_REPEATS.value) / repeats
  return 2 * 2 * rows * config.embed_dim * config.mlp_dim / seconds


def main(argv):
  del argv
  if _CHECKPOINT.value:
    config, params, _ = jacobi_models.trained_model(_CHECKPOINT.value)
  else:
    config, params = jacobi_models.random_model(16)
  peak = flops.measure_matmul_peak(size=1024, dtype="float32")
  print(f"matmul peak {peak.flops_per_second / 1e9:.1f} GFLOP/s ({peak.device}, 1024, float32)")
  print("| window | rows | decoder call | vs window 1 | MLP matmul GFLOP/s | share of peak |")
  print("|---|---|---|---|---|---|")
  base = None
  for window in map(int, _WINDOWS.value):
    seconds = decoder_call_seconds(config, params, window, _CALLS.value)
    base = base or seconds
    rate = mlp_matmul_flops_per_second(config, 2 * window)
    print(
      f"| {window} | {2 * window} | {seconds * 1e3:.3f} ms | {seconds / base:.2f}x | "
      f"{rate / 1e9:.1f} | {rate / peak.flops_per_second:.0%} |"
    )


if __name__ == "__main__":
  app.run(main)
