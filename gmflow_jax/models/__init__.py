"""Flax NNX networks: GM-DiT (spec §8) and the SpectrumMLP (spec §4)."""

from gmflow_jax.models.gmdit import GMDiT
from gmflow_jax.models.spectrum import SpectrumMLP

__all__ = ["GMDiT", "SpectrumMLP"]
