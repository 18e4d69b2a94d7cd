"""Forward process and moves between time levels (docs/method.md §1, §6).

Path ``x_t = α x0 + σ ε`` with ``σ = t`` and ``α = 1 − t``. Noise levels ``sigma``
are scalars or shape ``(N,)`` and broadcast over the remaining axes. The network sees the time
as ``τ = 1000 t`` (``to_tau``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gmflow_jax.gm import GM, Gaussian, as_float32, check_points, gm_mul_iso_gaussian

Array = jax.Array

SIGMA_EPS = 1e-6
TAU_SCALE = 1000.0  # network time units per unit of t


def to_tau(t):
    """The network's time input ``τ = 1000 t`` (same shape as ``t``)."""
    return TAU_SCALE * t


def per_sample(value, ndim: int) -> Array:
    """A scalar or (N,) array as float32 broadcastable against an array of rank ``ndim``."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 0:
        return value
    if value.ndim != 1:
        raise ValueError(f"noise levels must be a scalar or of shape (N,); got {value.shape}.")
    return value.reshape(value.shape + (1,) * (ndim - 1))


def diffuse(x0: Array, noise: Array, sigma) -> Array:
    """``x_t = (1 − σ) x0 + σ ε``: (*B, C)."""
    s = per_sample(sigma, x0.ndim)
    return (1.0 - s) * x0 + s * noise


def u_to_x0(gm_u: GM, x_t: Array, sigma) -> GM:
    """A GM over the velocity ``u = ε − x0`` at ``(x_t, σ)`` -> the GM over ``x0``."""
    gm_u = as_float32(gm_u)
    x_t = check_points(gm_u, x_t, "x_t")
    s = per_sample(sigma, gm_u.means.ndim)
    means = x_t[..., None, :] - s * gm_u.means
    logstds = gm_u.logstds + jnp.log(jnp.maximum(s, SIGMA_EPS))
    return GM(means, gm_u.logweights, logstds)


def transition_coefs(sigma, sigma_to, ndim: int) -> tuple[Array, Array, Array]:
    """``(c1, c2, c3)`` of ``q(x_σ' | x_σ, x0) = N(c1 x_σ + c2 x0, c3 I)`` for σ' < σ."""
    s, s_to = per_sample(sigma, ndim), per_sample(sigma_to, ndim)
    alpha, alpha_to = 1.0 - s, 1.0 - s_to
    ratio_s = s_to / jnp.maximum(s, SIGMA_EPS)
    ratio_a = alpha / jnp.maximum(alpha_to, SIGMA_EPS)
    b = 1.0 - (ratio_s * ratio_a) ** 2
    return ratio_s**2 * ratio_a, b * alpha_to, b * s_to**2


def reverse_transition(gm_x0: GM, x_t: Array, sigma, sigma_to) -> GM:
    """The GM of ``x_{σ'}`` given ``x_σ`` implied by an x0-GM (method.md §6), σ' < σ."""
    gm_x0 = as_float32(gm_x0)
    x_t = check_points(gm_x0, x_t, "x_t")
    c1, c2, c3 = transition_coefs(sigma, sigma_to, gm_x0.means.ndim)
    means = c1 * x_t[..., None, :] + c2 * gm_x0.means
    logstds = 0.5 * jnp.logaddexp(
        2.0 * gm_x0.logstds + 2.0 * jnp.log(jnp.maximum(c2, SIGMA_EPS)), jnp.log(jnp.maximum(c3, SIGMA_EPS))
    )
    return GM(means, gm_x0.logweights, logstds)


def convert_denoising_gm(gm_x0: GM, x_src: Array, sigma_src, x_tgt: Array, sigma_tgt) -> GM:
    """Paper Eq. 10: the x0-GM at ``(x_src, σ_src)`` -> the x0-GM at ``(x_tgt, σ_tgt)``.

    Multiplies by the Gaussian in x0 proportional to ``p(x_tgt | x0) / p(x_src | x0)``.
    """
    gm_x0 = as_float32(gm_x0)
    x_src = check_points(gm_x0, x_src, "x_src")
    x_tgt = check_points(gm_x0, x_tgt, "x_tgt")
    s_src, s_tgt = per_sample(sigma_src, x_src.ndim), per_sample(sigma_tgt, x_src.ndim)
    a_src, a_tgt = 1.0 - s_src, 1.0 - s_tgt
    denom = jnp.maximum((a_tgt * s_src) ** 2 - (a_src * s_tgt) ** 2, SIGMA_EPS)
    mean = (a_tgt * s_src**2 * x_tgt - a_src * s_tgt**2 * x_src) / denom
    var = (s_tgt * s_src) ** 2 / denom  # (N, 1, .., 1) or a scalar
    return gm_mul_iso_gaussian(gm_x0, Gaussian(mean, var))
