"""parti-pytorch 0.2.0 (lucidrains), measured beside our benches in the same run.

A ratio against a figure from another day is not a measurement: these machines move
about 2x from day to day. So the training and sampling benches build the peer at the
same shape and time it in the same process, just after our own figure, when it is
installed (`pip install -e .[peer]`: parti-pytorch, and the torch and torchvision it
imports). Without it they print no ratio.

The peer's text conditioning is a frozen T5's output, which it takes as an input
(`text_token_embeds`); we give it random embeddings of the matched width, as a
pipeline that pre-computes T5 embeddings would. Its constructor asks transformers for
the T5's width even when it is given one, so a local T5Config is put in parti-pytorch's
own config cache first: nothing is downloaded.

The peer's architecture, for the FLOP count below (parti_pytorch/parti_pytorch.py):
decoder-only blocks of causal self-attention, cross-attention to the text, and a GELU
MLP with a LayerNorm inside; both attentions are multi-query with one `dim_head` vector
serving as key and value, plus a learned null key; the logits are tied to the token
embedding; guidance runs the whole prefix twice per token (no KV cache).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time

PEER = "parti-pytorch 0.2.0"


def available() -> bool:
  """Whether the peer (and torch) can be imported here."""
  return all(importlib.util.find_spec(name) for name in ("torch", "parti_pytorch"))


@dataclasses.dataclass(frozen=True)
class PeerShape:
  """The peer's model at one shape: decoder width, depth, heads, MLP, codebook, lengths."""

  dim: int = 256
  depth: int = 4
  heads: int = 4
  dim_head: int = 64
  ff_mult: int = 4
  codebook_size: int = 512
  grid: int = 16
  text_length: int = 32
  text_dim: int = 256

  @property
  def image_length(self) -> int:
    return self.grid * self.grid

  def forward_flops(self) -> float:
    """Matmul FLOPs of one example's teacher-forced forward (full attention, as ours count)."""
    n, t, d, dh = self.image_length, self.text_length, self.dim, self.dim_head
    inner = self.heads * dh
    self_attention = 2 * (n * d * inner + n * d * dh + n * inner * d) + 2 * 2 * n * (n + 1) * inner
    cross_attention = (
      2 * (n * d * inner + t * self.text_dim * dh + n * inner * d) + 2 * 2 * n * (t + 1) * inner
    )
    mlp = 2 * 2 * n * d * self.ff_mult * d
    logits = 2 * n * d * self.codebook_size
    return float(self.depth * (self_attention + cross_attention + mlp) + logits)


def _build(shape: PeerShape):
  import torch
  from parti_pytorch import t5 as peer_t5
  from transformers import T5Config

  peer_t5.T5_CONFIGS[peer_t5.DEFAULT_T5_NAME] = {"config": T5Config(d_model=shape.text_dim)}
  from parti_pytorch import Parti, VitVQGanVAE

  torch.manual_seed(0)
  # The VAE only tells the transformer its codebook size and grid; it is never run.
  vae = VitVQGanVAE(
    dim=32,
    image_size=shape.grid * 16,
    layers=1,
    codebook_size=shape.codebook_size,
    use_vgg_and_gan=False,
  )
  model = Parti(
    vae=vae,
    dim=shape.dim,
    depth=shape.depth,
    heads=shape.heads,
    dim_head=shape.dim_head,
    ff_mult=shape.ff_mult,
    text_embed_dim=shape.text_dim,
    max_text_len=shape.text_length,
  )
  params = [p for name, p in model.named_parameters() if not name.startswith("vae.")]
  return model, params


def train_step_seconds(shape: PeerShape, batch: int, steps: int) -> dict[str, float]:
  """The peer's train step (forward, backward, its AdamW) on random tokens and text."""
  import torch
  from parti_pytorch.optimizer import get_optimizer

  model, params = _build(shape)
  optimizer = get_optimizer(params)
  text = torch.randn(batch, shape.text_length, shape.text_dim)
  tokens = torch.randint(0, shape.codebook_size, (batch, shape.image_length))

  def step():
    loss = model(text_token_embeds=text, image_token_ids=tokens, return_loss=True)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  for _ in range(2):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  seconds = (time.perf_counter() - start) / steps
  return {
    "step_s": seconds,
    "tokens_per_s": batch * shape.image_length / seconds,
    "parameters_m": sum(p.numel() for p in params) / 1e6,
    "model_gflops_per_s": 3 * batch * shape.forward_flops() / seconds / 1e9,
  }


def generate_seconds(shape: PeerShape, batch: int, cond_scale: float) -> float:
  """Seconds for the peer to sample one batch of whole images with guidance.

  The loop is parti-pytorch's `Parti.generate` with the text embeddings given instead
  of encoded by T5 (`generate` itself only takes strings): each token re-runs the whole
  prefix, conditioned and unconditioned, then top-k filtering and Gumbel sampling.
  """
  import torch
  from parti_pytorch import parti_pytorch as peer

  model, _ = _build(shape)
  model.eval()
  text = torch.randn(batch, shape.text_length, shape.text_dim)
  mask = torch.ones(batch, shape.text_length, dtype=torch.bool)
  start = time.perf_counter()
  with torch.no_grad():
    tokens = torch.empty((batch, 0), dtype=torch.long)
    for _ in range(shape.image_length):
      logits = model.forward_with_cond_scale(
        text_token_embeds=text, text_mask=mask, image_token_ids=tokens, cond_scale=cond_scale
      )[:, -1]
      sampled = peer.gumbel_sample(peer.top_k(logits, thres=0.9), temperature=1.0)
      tokens = torch.cat((tokens, sampled[:, None]), dim=-1)
  return time.perf_counter() - start


def matmul_peak(size: int = 1024, trials: int = 5, chain: int = 8) -> float:
  """torch's float32 matmul FLOP/s on square matrices (best of `trials` chains)."""
  import torch

  x = torch.randn(size, size)
  q, _ = torch.linalg.qr(torch.randn(size, size))
  best = float("inf")
  for _ in range(trials + 1):  # The first chain warms the thread pool up.
    start = time.perf_counter()
    y = x
    for _ in range(chain):
      y = y @ q
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 * chain / best
