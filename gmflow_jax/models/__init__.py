"""Flax NNX networks: GM-DiT (method.md §8) and the SpectrumMLP (method.md §4)."""

from gmflow_jax.models.gmdit import GMDiT
from gmflow_jax.models.spectrum import SpectrumMLP

__all__ = ["GMDiT", "SpectrumMLP"]
