"""Training objectives (docs/method.md §5): GM NLL, transition loss, spectral loss, L2 baseline."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gmflow_jax.flow import TAU_SCALE, diffuse, per_sample, reverse_transition, to_tau, u_to_x0
from gmflow_jax.gm import GM, Gaussian, as_float32, gm_logprob, gm_to_iso_gaussian, spectral_excess

Array = jax.Array

MAX_INV_STD = 1e4  # 1/s is clamped to this in the NLL (method.md §5.3)
TAU_MIN = 1e-4  # network time units


def gm_nll(gm: GM, x: Array) -> Array:
    """``−log q(x)`` without the ``(C/2) log 2π`` constant, ``1/s`` clamped ≤ 1e4: (*B,) (method.md §5.3)."""
    gm = as_float32(gm)
    gm = gm._replace(logstds=jnp.maximum(gm.logstds, -math.log(MAX_INV_STD)))
    return -gm_logprob(gm, x) - 0.5 * gm.means.shape[-1] * math.log(2.0 * math.pi)


def l2_flow_loss(u_pred: Array, u: Array) -> Array:
    """Flow-matching baseline ``½‖u − u_pred‖²`` per pixel: (*B, C) -> (*B,)."""
    return 0.5 * jnp.sum((jnp.asarray(u, jnp.float32) - jnp.asarray(u_pred, jnp.float32)) ** 2, axis=-1)


def sample_t(key: Array, n: int, *, mode: str = "uniform", shift: float = 1.0) -> Array:
    """Training times t (n,): ``1 − U(0,1)`` or ``sigmoid(N(0,1))``, shifted, τ clamped."""
    if mode == "uniform":
        t = 1.0 - jax.random.uniform(key, (n,), jnp.float32)
    elif mode == "logit_normal":
        t = jax.nn.sigmoid(jax.random.normal(key, (n,), jnp.float32))
    else:
        raise ValueError(f"time sampling mode must be 'uniform' or 'logit_normal'; got {mode!r}.")
    t = shift * t / (1.0 + (shift - 1.0) * t)
    return jnp.clip(to_tau(t), TAU_MIN, TAU_SCALE) / TAU_SCALE


def transition_pair(key: Array, x0: Array, t: Array, trans_ratio: float) -> tuple[Array, Array, Array]:
    """Draws ``(x_t, x_lo, t_lo)`` for the transition loss (method.md §5.2); x0 (N, ..., C), t (N,)."""
    if not 0.0 <= trans_ratio <= 1.0:
        raise ValueError(f"trans_ratio must lie in [0, 1]; got {trans_ratio}.")
    x0 = jnp.asarray(x0, jnp.float32)
    tau = to_tau(t)
    t_lo = jnp.maximum(0.0, jnp.minimum(tau * (1.0 - trans_ratio), tau - TAU_MIN)) / TAU_SCALE
    k0, k1 = jax.random.split(key)
    eps0 = jax.random.normal(k0, x0.shape, jnp.float32)
    eps1 = jax.random.normal(k1, x0.shape, jnp.float32)
    tb, tlob = per_sample(t, x0.ndim), per_sample(t_lo, x0.ndim)
    x_lo = diffuse(x0, eps0, t_lo)
    scale = (1.0 - tb) / (1.0 - tlob)
    x_t = scale * x_lo + jnp.sqrt(jnp.maximum(tb**2 - (scale * tlob) ** 2, 0.0)) * eps1
    return x_t, x_lo, t_lo


def transition_nll(gm_u: GM, x_t: Array, t: Array, x_lo: Array, t_lo: Array) -> Array:
    """Per-pixel NLL of ``x_lo`` under the reverse transition of the u-GM at ``(x_t, t)``: (*B,)."""
    gm_lo = reverse_transition(u_to_x0(gm_u, x_t, t), x_t, t, t_lo)
    return gm_nll(gm_lo, x_lo)


def spectral_loss(gm_u: GM, x_t: Array, x0: Array, t: Array, spectrum_fn: Callable[[Gaussian], Array]) -> Array:
    """Spectral loss per sample (N,): mean over pixels of ``Σ_C e`` (method.md §5.4).

    Gradients flow only into ``spectrum_fn`` (the SpectrumMLP), which maps the
    isotropic Gaussian of the x0-GM to a log spectrum (N, H, W, C).
    """
    gm_u = jax.tree.map(jax.lax.stop_gradient, as_float32(gm_u))
    x_t = jax.lax.stop_gradient(jnp.asarray(x_t, jnp.float32))
    x0 = jax.lax.stop_gradient(jnp.asarray(x0, jnp.float32))
    tb = per_sample(t, x_t.ndim)
    u_star = (x_t - x0) / tb
    iso = gm_to_iso_gaussian(gm_u)
    g_x0 = Gaussian(x_t - tb * iso.mean, tb**2 * iso.var)
    e = spectral_excess(gm_u, u_star, spectrum_fn(jax.tree.map(jax.lax.stop_gradient, g_x0)))
    return jnp.mean(jnp.sum(e, axis=-1), axis=tuple(range(1, e.ndim - 1)))
