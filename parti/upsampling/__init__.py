"""Parti's super-resolution stage: a WDSR upsampler from the tokenizer's images to larger ones."""
