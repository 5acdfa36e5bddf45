"""The input pipeline, imported as `parti.tasks`: seqio tasks, TFDS builders, vocabularies.

This is the one part of the project that uses TensorFlow.
"""

# jaxlib must load before TensorFlow: both bundle native runtimes, and with
# TensorFlow's loaded first a shuffled tf.data pipeline with Python map functions
# deadlocks once jax is imported (seen with jax 0.10.2 and TensorFlow 2.21).
# Importing parti.tasks first makes the order right; see docs/troubleshooting.md.
import jax  # noqa: F401
