"""The input pipeline, imported as `parti.tasks`: seqio tasks, TFDS builders, vocabularies.

This is the one part of the project that uses TensorFlow.
"""
