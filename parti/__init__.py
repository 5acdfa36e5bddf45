"""Parti in JAX: autoregressive text-to-image generation.

Subpackages:
  parti             the text-to-image encoder-decoder, its sharding, jobs and sampling;
  parti.tokenizer   the ViT-VQGAN image tokenizer (from the checkout's `tokenizer/`);
  parti.tasks       seqio tasks, TFDS builders and vocabularies (from `tasks/`).

Only `parti.tasks` and the input pipeline need TensorFlow; everything else
imports and runs without it.
"""

__version__ = "0.1.0.dev0"
