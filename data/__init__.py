"""Importing any module of the package runs startup first: TensorFlow's process defaults, before TensorFlow
(without loading it: flags are defined and checked before it loads)."""

from transfer_engine import startup  # noqa: F401
