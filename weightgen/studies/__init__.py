"""Experiment drivers on top of the library (checkpoints in, evaluation, CSV/PNG/TensorBoard out)."""
