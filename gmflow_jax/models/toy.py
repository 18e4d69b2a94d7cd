"""MLP denoiser for 2-D toy data (paper §5.1), Flax NNX.

Input ``x_t (N, C)`` and ``tau (N,)`` (= 1000 t); output a GM over the velocity u with
means ``(N, K, C)``, logweights ``(N, K)`` and one logstd per sample ``(N, 1, 1)``.
With ``num_components=1`` and ``learn_std=False`` it is the flow-matching baseline
(the GM's mean is the predicted velocity, the std fixed to 1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gmflow_jax.gm import GM


def sincos_features(x: jax.Array, freqs: jax.Array) -> jax.Array:
    """``[sin(x f), cos(x f)]`` per input coordinate: (N, D) -> (N, 2 · D · F)."""
    arg = (x[..., :, None] * freqs).reshape(x.shape[0], -1)
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


class ToyGMFlow(nnx.Module):
    """Sin-cos features of ``x`` and ``τ`` -> ``num_layers`` SiLU layers -> GM head + logstd head."""

    def __init__(
        self,
        *,
        num_components: int = 64,
        channels: int = 2,
        hidden: int = 256,
        num_layers: int = 5,
        num_freqs: int = 8,
        learn_std: bool = True,
        rngs: nnx.Rngs,
    ):
        self.k, self.c, self.learn_std, self.num_freqs = num_components, channels, learn_std, num_freqs
        in_dim = 2 * channels * num_freqs + 2 * num_freqs
        dims = [in_dim] + [hidden] * num_layers
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)])
        self.head = nnx.Linear(hidden, num_components * (channels + 1), rngs=rngs)
        if learn_std:
            self.std_hidden = nnx.Linear(2 * num_freqs, hidden, rngs=rngs)
            self.std_out = nnx.Linear(hidden, 1, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x_t: jax.Array, tau: jax.Array, labels: jax.Array | None = None) -> GM:
        x_t = jnp.asarray(x_t, jnp.float32)
        f = jnp.arange(self.num_freqs, dtype=jnp.float32)
        # x in [-4, 4]: periods 32, 16, ..., 32 / 2^(F-1); τ in [0, 1000]: DiT-style geometric frequencies.
        x_freqs = (2.0 * math.pi / 32.0) * 2.0**f
        t_freqs = jnp.exp(-math.log(10000.0) * f / self.num_freqs)
        t_feat = sincos_features(jnp.asarray(tau, jnp.float32)[:, None], t_freqs)
        h = jnp.concatenate([sincos_features(x_t, x_freqs), t_feat], axis=-1)
        for layer in self.layers:
            h = jax.nn.silu(layer(h))
        out = self.head(h).reshape(x_t.shape[0], self.k, self.c + 1)
        means, logweights = out[..., : self.c], jax.nn.log_softmax(out[..., self.c], axis=-1)
        if self.learn_std:
            logstds = self.std_out(jax.nn.silu(self.std_hidden(t_feat)))[:, :, None]
        else:
            logstds = jnp.zeros((x_t.shape[0], 1, 1), jnp.float32)
        return GM(means, logweights, logstds)
