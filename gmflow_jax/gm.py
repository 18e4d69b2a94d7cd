"""Gaussian-mixture and isotropic-Gaussian algebra, KR transport, spectral transform.

docs/method.md §2–4. Shapes follow method.md §1: a GM over ``R^C`` at every pixel has
``means (*B, K, C)``, ``logweights (*B, K)`` (normalised) and ``logstds``
broadcastable to ``(*B, 1, 1)``; an isotropic Gaussian has ``mean (*B, C)`` and
``var`` broadcastable to ``(*B, 1)``. All arithmetic runs in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erfinv
from jax.scipy.stats import norm

Array = jax.Array

PRODUCT_EPS = 1e-6  # clamp of the product denominators (method.md §2), relative below unit scale


def _clamp_denominator(denom: Array, scale: Array) -> Array:
    """``max(D, 1e-6 · min(1, scale))``: the authors' absolute clamp for variances of order 1 and
    above, relative for smaller ones, so that a ratio of two equal tiny Gaussians stays ~identity."""
    return jnp.maximum(denom, PRODUCT_EPS * jnp.minimum(1.0, scale))


KR_CLAMP = 1e-6  # clamp of 2F - 1 in the forward KR map (method.md §3)


class GM(NamedTuple):
    """Isotropic Gaussian mixture: means (*B, K, C), logweights (*B, K), logstds (*B|1, 1, 1)."""

    means: Array
    logweights: Array
    logstds: Array


class Gaussian(NamedTuple):
    """Isotropic Gaussian: mean (*B, C), var broadcastable to (*B, 1)."""

    mean: Array
    var: Array


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def check_gm_shapes(gm: GM) -> None:
    """Raises ValueError unless the fields of ``gm`` (arrays or shape structs) fit method.md §1."""
    means, logweights, logstds = (tuple(np.shape(a)) if not hasattr(a, "shape") else tuple(a.shape) for a in gm)
    if len(means) < 2:
        raise ValueError(f"GM means must have shape (*B, K, C); got {means}.")
    if logweights != means[:-1]:
        raise ValueError(
            f"GM logweights must have shape (*B, K) = {means[:-1]} to match means {means}; got {logweights}."
        )
    target = means[:-2] + (1, 1)
    try:
        ok = len(logstds) <= len(target) and np.broadcast_shapes(logstds, target) == target
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"GM logstds must be broadcastable to (*B, 1, 1) = {target}; got {logstds}.")


def as_float32(gm: GM) -> GM:
    """Validates the shapes of ``gm`` and casts it to float32."""
    check_gm_shapes(gm)
    return GM(*(_f32(a) for a in gm))


def _gaussian_f32(g: Gaussian) -> Gaussian:
    mean, var = jnp.asarray(g.mean), jnp.asarray(g.var)
    target = mean.shape[:-1] + (1,)
    try:
        ok = var.ndim <= len(target) and np.broadcast_shapes(var.shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"Gaussian var must be broadcastable to (*B, 1) = {target}; got {var.shape}.")
    return Gaussian(_f32(mean), _f32(var))


def check_points(gm: GM, x: Array, name: str = "x") -> Array:
    """``x`` as float32 after checking it is (*B, C) for the GM's (*B, K, C) means."""
    x = jnp.asarray(x)
    expected = gm.means.shape[:-2] + gm.means.shape[-1:]
    if x.shape != expected:
        raise ValueError(f"{name} must have shape (*B, C) = {expected} to match the GM; got {x.shape}.")
    return _f32(x)


def gm_mean(gm: GM) -> Array:
    """Mean of the mixture, (*B, C)."""
    gm = as_float32(gm)
    w = jax.nn.softmax(gm.logweights, axis=-1)
    return jnp.einsum("...k,...kc->...c", w, gm.means)


def gm_to_iso_gaussian(gm: GM) -> Gaussian:
    """Isotropic moment match: mean (*B, C), var (*B, 1) (method.md §2)."""
    gm = as_float32(gm)
    w = jax.nn.softmax(gm.logweights, axis=-1)
    mean = jnp.einsum("...k,...kc->...c", w, gm.means)
    spread = jnp.sum((gm.means - mean[..., None, :]) ** 2, axis=-1)  # (*B, K)
    var = jnp.sum(w * spread, axis=-1, keepdims=True) / gm.means.shape[-1]
    var = var + jnp.exp(2.0 * gm.logstds)[..., 0]
    return Gaussian(mean, var)


def iso_gaussian_mul_iso_gaussian(g1: Gaussian, g2: Gaussian, p1: float = 1.0, p2: float = 1.0) -> Gaussian:
    """Renormalised ``N1^p1 · N2^p2`` of two isotropic Gaussians (powers may be negative)."""
    g1, g2 = _gaussian_f32(g1), _gaussian_f32(g2)
    denom = _clamp_denominator(p1 * g2.var + p2 * g1.var, jnp.abs(p1 * g2.var) + jnp.abs(p2 * g1.var))
    var = g1.var * g2.var / denom
    mean = (p1 * g2.var * g1.mean + p2 * g1.var * g2.mean) / denom
    return Gaussian(mean, var)


def gm_mul_iso_gaussian(gm: GM, g: Gaussian, gm_power: float = 1.0, g_power: float = 1.0) -> GM:
    """Renormalised product of ``gm^gm_power`` and ``g^g_power`` (method.md §2), a GM."""
    gm, g = as_float32(gm), _gaussian_f32(g)
    ratio = g_power / gm_power
    var = g.var[..., None]  # (*B, 1, 1)
    s2 = jnp.exp(2.0 * gm.logstds)
    denom = _clamp_denominator(var + ratio * s2, var + abs(ratio) * s2)
    means = (var * gm.means + ratio * s2 * g.mean[..., None, :]) / denom
    sqdist = jnp.sum((gm.means - g.mean[..., None, :]) ** 2, axis=-1)  # (*B, K)
    logweights = jax.nn.log_softmax(gm.logweights - (ratio / (2.0 * denom[..., 0])) * sqdist, axis=-1)
    logstds = gm.logstds + 0.5 * jnp.log(jnp.maximum(var, 1e-30)) - 0.5 * jnp.log(denom)
    return GM(means, logweights, logstds)


def gm_logprob(gm: GM, x: Array) -> Array:
    """``log q(x)`` with the ``(C/2) log 2π`` constant: x (*B, C) -> (*B,)."""
    gm = as_float32(gm)
    x = check_points(gm, x)
    c = gm.means.shape[-1]
    logstds = jnp.broadcast_to(gm.logstds, gm.means.shape[:-2] + (1, 1))[..., 0]  # (*B, 1)
    sqdist = jnp.sum((x[..., None, :] - gm.means) ** 2, axis=-1)  # (*B, K)
    inner = jax.nn.logsumexp(gm.logweights - 0.5 * sqdist * jnp.exp(-2.0 * logstds), axis=-1)
    return inner - c * logstds[..., 0] - 0.5 * c * math.log(2.0 * math.pi)


def gm_sample(key: Array, gm: GM) -> Array:
    """One sample per pixel: (*B, C)."""
    gm = as_float32(gm)
    k_key, z_key = jax.random.split(key)
    # Inverse-CDF component choice: one uniform per pixel (K Gumbels per pixel cost ~5x more).
    cdf = jnp.cumsum(jax.nn.softmax(gm.logweights, axis=-1), axis=-1)  # (*B, K)
    u = jax.random.uniform(k_key, cdf.shape[:-1] + (1,), jnp.float32) * cdf[..., -1:]
    idx = jnp.minimum(jnp.sum(cdf < u, axis=-1), cdf.shape[-1] - 1)  # (*B,)
    mu = jnp.take_along_axis(gm.means, idx[..., None, None], axis=-2)[..., 0, :]
    z = jax.random.normal(z_key, mu.shape, jnp.float32)
    return mu + jnp.exp(gm.logstds[..., 0]) * z


# --- Knothe-Rosenblatt transport (method.md §3) -------------------------------------------


def _kr_frame(gm: GM) -> Array:
    """Per-sample rotation Q (eigenvectors of the pixel-averaged covariance, descending)."""
    w = jax.nn.softmax(gm.logweights, axis=-1)
    mean = jnp.einsum("...k,...kc->...c", w, gm.means)
    d = gm.means - mean[..., None, :]
    c = gm.means.shape[-1]
    cov = jnp.einsum("...k,...kc,...kd->...cd", w, d, d)  # (*B, C, C)
    cov = cov + jnp.exp(2.0 * gm.logstds) * jnp.eye(c, dtype=cov.dtype)
    batch_ndim = gm.means.ndim - 2
    if batch_ndim > 1:  # average over the pixel axes of each sample
        cov = jnp.mean(cov, axis=tuple(range(1, batch_ndim)), keepdims=True)
    _, vecs = jnp.linalg.eigh(cov)
    return vecs[..., ::-1]  # (N, 1.., C, C), columns in descending eigenvalue order


def _conditional_logweights(gm: GM, nu: Array, y: Array, d: int, inv_s2: Array) -> Array:
    """log w^(d): (*B, K), conditioned on the first d rotated coordinates y[..., :d]."""
    if d == 0:
        return gm.logweights
    sq = jnp.sum((y[..., None, :d] - nu[..., :d]) ** 2, axis=-1)
    return jax.nn.log_softmax(gm.logweights - 0.5 * sq * inv_s2, axis=-1)


def gm_to_standard_normal(gm: GM, x: Array) -> Array:
    """Forward KR map of GM samples x (*B, C) to N(0, I), in the rotated frame."""
    gm = as_float32(gm)
    x = check_points(gm, x)
    q = _kr_frame(gm)
    y = jnp.einsum("...c,...cd->...d", x, q)
    nu = jnp.einsum("...kc,...cd->...kd", gm.means, q)
    s = jnp.exp(gm.logstds[..., 0])  # (*B|1, 1)
    inv_s2 = 1.0 / s**2
    zs = []
    for d in range(x.shape[-1]):
        logw = _conditional_logweights(gm, nu, y, d, inv_s2)
        cdf = jnp.sum(jnp.exp(logw) * norm.cdf((y[..., d : d + 1] - nu[..., d]) / s), axis=-1)
        u = jnp.clip(2.0 * cdf - 1.0, -1.0 + KR_CLAMP, 1.0 - KR_CLAMP)
        zs.append(math.sqrt(2.0) * erfinv(u))
    return jnp.stack(zs, axis=-1)


def standard_normal_to_gm(gm: GM, z: Array, newton_steps: int = 16) -> Array:
    """Inverse KR map: z (*B, C) in the rotated frame -> GM samples (*B, C)."""
    gm = as_float32(gm)
    z = check_points(gm, z, "z")
    q = _kr_frame(gm)
    nu = jnp.einsum("...kc,...cd->...kd", gm.means, q)
    s = jnp.exp(gm.logstds[..., 0])  # (*B|1, 1)
    inv_s2 = 1.0 / s**2
    c = z.shape[-1]
    y = jnp.zeros_like(z)
    for d in range(c):
        w = jnp.exp(_conditional_logweights(gm, nu, y, d, inv_s2))  # (*B, K)
        nu_d = nu[..., d]
        m = jnp.sum(w * nu_d, axis=-1)
        v = jnp.sum(w * (nu_d - m[..., None]) ** 2, axis=-1) + s[..., 0] ** 2
        target = norm.cdf(z[..., d])

        def newton(_, yd, w=w, nu_d=nu_d, target=target):
            t = (yd[..., None] - nu_d) / s
            cdf = jnp.sum(w * norm.cdf(t), axis=-1)
            pdf = jnp.sum(w * norm.pdf(t), axis=-1) / s[..., 0]
            step = jnp.clip((cdf - target) / jnp.maximum(pdf, 1e-6), -1.5 * s[..., 0], 1.5 * s[..., 0])
            return yd - step

        yd = jax.lax.fori_loop(0, newton_steps, newton, m + jnp.sqrt(v) * z[..., d])
        y = y.at[..., d].set(yd)
    return jnp.einsum("...d,...cd->...c", y, q)


# --- Spectral transform and spectral sampling (method.md §4) --------------------------------


def spectral_transform(x: Array) -> Array:
    """``T(x) = Re F(x) + Im F(x)``, orthonormal 2-D DFT over axes (1, 2) of (N, H, W, C)."""
    x = _f32(x)
    if x.ndim != 4:
        raise ValueError(f"spectral_transform expects (N, H, W, C); got shape {x.shape}.")
    f = jnp.fft.fft2(x, axes=(1, 2), norm="ortho")
    return f.real + f.imag


def log_spectrum_from_logits(logits: Array, shape: tuple[int, int, int], base: tuple[int, int]) -> Array:
    """SpectrumMLP output (N, C·Hb·Wb), channel-major, -> log power spectrum L (N, H, W, C).

    Keeps the low frequencies when H < Hb (rows ``[0, ⌈H/2⌉) ∪ [Hb − ⌊H/2⌋, Hb)``, same
    for columns), then normalises so that the mean of ``exp(L)`` over (H, W) is 1.
    """
    h, w, c = shape
    hb, wb = base
    if h > hb or w > wb:
        raise ValueError(f"spectrum of size {(h, w)} exceeds the network's base size {(hb, wb)}.")
    logits = _f32(logits).reshape(-1, c, hb, wb)
    rows = np.r_[0 : (h + 1) // 2, hb - h // 2 : hb]
    cols = np.r_[0 : (w + 1) // 2, wb - w // 2 : wb]
    spec = logits[:, :, rows][:, :, :, cols].transpose(0, 2, 3, 1)  # (N, H, W, C)
    flat = spec.reshape(spec.shape[0], h * w, c)
    flat = jax.nn.log_softmax(flat, axis=1) + math.log(h * w)
    return flat.reshape(spec.shape)


def spectral_sample(key: Array, gm: GM, log_spectrum: Array) -> Array:
    """Spectral sampling of x0 (N, H, W, C) from a per-pixel GM and a log spectrum L."""
    z_r = jnp.exp(0.5 * _f32(log_spectrum)) * jax.random.normal(key, log_spectrum.shape, jnp.float32)
    return standard_normal_to_gm(gm, spectral_transform(z_r))


def spectral_excess(gm: GM, x0: Array, log_spectrum: Array) -> Array:
    """Per-element density correction ``e = ½(z_r²(e^{−L} − 1) + L)``, (N, H, W, C).

    ``log q_S(x0) = gm_logprob(gm, x0).sum() − e.sum()`` over (H, W, C).
    """
    log_spectrum = _f32(log_spectrum)
    z_r = spectral_transform(gm_to_standard_normal(gm, x0))
    return 0.5 * (z_r**2 * (jnp.exp(-log_spectrum) - 1.0) + log_spectrum)
