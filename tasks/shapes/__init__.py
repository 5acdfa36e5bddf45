"""The procedural compositional shapes dataset: spec, scenes, rendering, evaluator, TFDS builder."""
