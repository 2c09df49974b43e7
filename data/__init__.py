"""Importing any module of the package loads internals first: TensorFlow's process defaults, before TensorFlow."""

from transfer_engine import internals  # noqa: F401
