"""Sampling: prompts in, image tokens out (KV-cached decoding with classifier-free
guidance), and reranking of the samples."""
