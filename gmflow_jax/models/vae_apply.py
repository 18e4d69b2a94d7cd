"""The VAE's jitted, batch-sharded entry points: ``encode`` (images -> scaled latents) and ``decode`` (scaled
latents -> uint8 images) over a ('data',) mesh of the local devices, weights replicated."""

from __future__ import annotations

import functools
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gmflow_jax.models.vae import AutoencoderKL

Array = jax.Array


def _encode_fn(graphdef: nnx.GraphDef, state: nnx.State, x: Array, key: Array | None) -> Array:
    vae = nnx.merge(graphdef, state)
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    mean, logvar = vae.encode_moments(x)
    if key is not None:  # noise of sample i from fold_in(key, i): independent of padding and device count

        def noise(i):
            return jax.random.normal(jax.random.fold_in(key, i), mean.shape[1:], jnp.float32)

        mean = mean + jnp.exp(0.5 * logvar) * jax.vmap(noise)(jnp.arange(mean.shape[0]))
    return mean * vae.config.scaling_factor


def _decode_fn(graphdef: nnx.GraphDef, state: nnx.State, latents: Array) -> Array:
    vae = nnx.merge(graphdef, state)
    x = vae.decode_latents(latents.astype(jnp.float32) / vae.config.scaling_factor)
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class _Runner:
    """Per-VAE jitted encode/decode over a ('data',) mesh of the local devices, weights replicated."""

    def __init__(self, vae: AutoencoderKL):
        self.mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
        self.batch = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())
        graphdef, _ = nnx.split(vae)
        self.encode = jax.jit(functools.partial(_encode_fn, graphdef), out_shardings=self.batch)
        self.decode = jax.jit(functools.partial(_decode_fn, graphdef), out_shardings=self.batch)
        self.leaves: list[Any] = []
        self.state: nnx.State | None = None

    def weights(self, vae: AutoencoderKL) -> nnx.State:
        """The replicated weights, re-copied only when the module's arrays changed since the last call."""
        state = nnx.state(vae)
        leaves = jax.tree.leaves(state)
        if len(leaves) != len(self.leaves) or any(a is not b for a, b in zip(leaves, self.leaves, strict=True)):
            self.leaves, self.state = leaves, jax.device_put(state, self.replicated)
        return self.state

    def shard(self, x: np.ndarray) -> tuple[Array, int]:
        """Pads the batch to a multiple of the device count and splits it; returns (array, real size)."""
        n = x.shape[0]
        pad = -n % self.mesh.size
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
        return jax.device_put(x, self.batch), n


_RUNNERS: weakref.WeakKeyDictionary[AutoencoderKL, _Runner] = weakref.WeakKeyDictionary()


def _runner(vae: AutoencoderKL) -> _Runner:
    if vae not in _RUNNERS:
        _RUNNERS[vae] = _Runner(vae)
    return _RUNNERS[vae]


def _check_batch(x: np.ndarray, what: str, channels: int, factor: int = 1) -> None:
    if x.ndim != 4 or x.shape[-1] != channels or x.shape[0] == 0 or x.shape[1] % factor or x.shape[2] % factor:
        raise ValueError(
            f"{what} must be (N, H, W, {channels}) with N >= 1 and H, W multiples of {factor}; got shape {x.shape}."
        )


def encode(vae: AutoencoderKL, images: Any, key: Array | None = None) -> Array:
    """Images (N, H, W, C), uint8 in [0, 255] or float in [-1, 1] -> scaled latents (N, H/f, W/f, latent), float32.

    With ``key``, a posterior sample ``mean + exp(logvar / 2)·ε`` (ε of sample i from ``fold_in(key, i)``);
    without, the posterior mean. Multiplied by ``config.scaling_factor``.
    """
    x = np.asarray(images)
    _check_batch(x, "images", vae.config.in_channels, vae.config.downsample_factor)
    if x.dtype != np.uint8 and not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"images must be uint8 or floating point; got dtype {x.dtype}.")
    run = _runner(vae)
    xs, n = run.shard(x)
    if key is not None:
        key = jax.device_put(key, run.replicated)
    out = run.encode(run.weights(vae), xs, key)
    return out if out.shape[0] == n else out[:n]


def decode(vae: AutoencoderKL, latents: Any) -> np.ndarray:
    """Scaled latents (N, h, w, latent_channels) -> uint8 images (N, h·f, w·f, out_channels), rounded and clipped."""
    z = np.asarray(latents)
    _check_batch(z, "latents", vae.config.latent_channels)
    if not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"latents must be floating point; got dtype {z.dtype}.")
    run = _runner(vae)
    zs, n = run.shard(z)
    return np.asarray(run.decode(run.weights(vae), zs))[:n]
