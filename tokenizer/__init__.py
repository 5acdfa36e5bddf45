"""The ViT-VQGAN image tokenizer, imported as `parti.tokenizer`.

It maps images to grids of codebook ids and back; it imports without TensorFlow.
"""
