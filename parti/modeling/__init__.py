"""The text-to-image model: its config, layers, the encoder-decoder, the contrastive
reranker's model, the t5x adapter, and FLOP counts."""
