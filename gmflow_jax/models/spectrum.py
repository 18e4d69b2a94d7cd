"""SpectrumMLP (method.md §4): per-sample Gaussian statistics -> log power spectrum L (N, H, W, C).

An instance is the ``spectrum_fn(gaussian) -> L`` that ``solvers.sample`` and
``losses.spectral_loss`` take. Parameters are float32 and replicated (logical axis names
``None``); the network is tiny and always computes in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmflow_jax.gm import Gaussian, log_spectrum_from_logits

Array = jax.Array


def spectrum_features(g: Gaussian) -> Array:
    """Per-sample statistics (N, 2): [mean over pixels of var, mean over C of the unbiased pixel variance of mean].

    ``g.mean`` is (N, H, W, C); ``g.var`` broadcastable to (N, H, W, 1).
    """
    mean, var = jnp.asarray(g.mean, jnp.float32), jnp.asarray(g.var, jnp.float32)
    if mean.ndim != 4:
        raise ValueError(f"Gaussian mean must have shape (N, H, W, C); got {mean.shape}.")
    target = mean.shape[:-1] + (1,)
    try:
        ok = var.ndim <= 4 and np.broadcast_shapes(var.shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"Gaussian var must be broadcastable to (N, H, W, 1) = {target}; got {var.shape}.")
    var_stat = jnp.mean(jnp.broadcast_to(var, target), axis=(1, 2, 3))
    mean_stat = jnp.mean(jnp.var(mean, axis=(1, 2), ddof=1), axis=-1)
    return jnp.stack([var_stat, mean_stat], axis=-1)


class SpectrumMLP(nnx.Module):
    """``Linear(2→64) SiLU Linear(64→8) SiLU Linear(8→C·Hb·Wb)`` then low-frequency crop and normalisation."""

    def __init__(
        self,
        *,
        channels: int = 4,
        base_size: Sequence[int] = (32, 32),
        hidden: Sequence[int] = (64, 8),
        eager_sharding: bool | None = False,
        rngs: nnx.Rngs,
    ):
        self.channels = channels
        self.base_size = tuple(int(s) for s in base_size)
        if len(self.base_size) != 2 or min(self.base_size) < 1 or channels < 1:
            raise ValueError(f"need channels >= 1 and base_size (Hb, Wb) >= 1; got {channels}, {base_size}.")
        widths = [2, *hidden, channels * self.base_size[0] * self.base_size[1]]
        layers = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            last = i == len(widths) - 2
            kernel_init = nnx.initializers.zeros_init() if last else nnx.initializers.xavier_uniform()
            layers.append(
                nnx.Linear(
                    fan_in,
                    fan_out,
                    param_dtype=jnp.float32,
                    kernel_init=nnx.with_partitioning(kernel_init, (None, None), eager_sharding=eager_sharding),
                    bias_init=nnx.with_partitioning(
                        nnx.initializers.zeros_init(), (None,), eager_sharding=eager_sharding
                    ),
                    rngs=rngs,
                )
            )
        self.layers = nnx.List(layers)

    def logits(self, features: Array) -> Array:
        """(N, 2) -> (N, C·Hb·Wb), laid out channel-major (C, Hb, Wb)."""
        h = jnp.asarray(features, jnp.float32)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = nnx.silu(h)
        return h

    def __call__(self, g: Gaussian) -> Array:
        """Log power spectrum L (N, H, W, C) of ``g`` (mean (N, H, W, C)); mean of exp(L) over (H, W) is 1."""
        _, h, w, c = jnp.shape(g.mean)
        if c != self.channels:
            raise ValueError(f"SpectrumMLP was built for {self.channels} channels; got a Gaussian with {c}.")
        return log_spectrum_from_logits(self.logits(spectrum_features(g)), (h, w, c), self.base_size)
