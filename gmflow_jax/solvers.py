"""Samplers (docs/method.md §7): GM-SDE / GM-ODE (1st and 2nd order) with probabilistic guidance,
and the baselines Euler, DDPM, DPM-Solver++(2M) and UniPC-2M with classifier-free guidance (CFG).

Everything is one ``jax.lax.scan`` over the steps; jit it with the configuration
(``solver``, ``order``, ``num_steps``, ``num_substeps``, ``denoise_fn``...) static.
``guidance`` may be traced (a scalar or a per-sample ``(N,)`` array), so a whole
guidance sweep compiles once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gmflow_jax.flow import convert_denoising_gm, per_sample, to_tau, transition_coefs, u_to_x0
from gmflow_jax.gm import (
    GM,
    Gaussian,
    as_float32,
    check_gm_shapes,
    gm_mean,
    gm_mul_iso_gaussian,
    gm_sample,
    gm_to_iso_gaussian,
    iso_gaussian_mul_iso_gaussian,
    spectral_sample,
)

Array = jax.Array
DenoiseFn = Callable[[Array, Array, Array | None], GM]

GM_SOLVERS = ("gm-ode", "gm-sde")
BASELINE_SOLVERS = ("euler", "ddpm", "dpmpp-2m", "unipc")
SOLVERS = GM_SOLVERS + BASELINE_SOLVERS
EPS = 1e-6
ADAPTER_EPS = 1e-6  # the authors' FlowAdapter clamps α = 1 − σ to at least this (method.md §7.6)


def default_orthogonal(solver: str) -> float:
    """The default ``orthogonal``: 1 (orthogonal probabilistic guidance) for GM solvers, 0 (plain CFG) for baselines."""
    return 1.0 if solver in GM_SOLVERS else 0.0


def time_grid(num_points: int, shift: float = 1.0) -> Array:
    """Noise levels ``σ_0 = 1 > ... > σ_{M−1} > σ_M = 0``: (M + 1,)."""
    u = 1.0 - jnp.arange(num_points, dtype=jnp.float32) / num_points
    sigmas = u / (u + (1.0 - u) / shift)  # = s u / (1 + (s − 1) u), exactly 1 at u = 1 in float32
    return jnp.concatenate([sigmas, jnp.zeros((1,), jnp.float32)])


def _pixel_mean(a: Array) -> Array:
    """Mean over every axis but the first, kept: (N, 1, ..., 1)."""
    return jnp.mean(a, axis=tuple(range(1, a.ndim)), keepdims=True)


def _project_out(delta: Array, mu: Array, orthogonal) -> Array:
    """Removes ``orthogonal`` times the component of ``delta`` along ``mu`` (per sample)."""
    coef = _pixel_mean(delta * mu) / jnp.maximum(_pixel_mean(mu * mu), EPS)
    return delta - orthogonal * coef * mu


def _concrete(value) -> np.ndarray | None:
    """The value as a NumPy array if it is known at trace time, else None."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_settings(solver, order, num_steps, num_substeps, guidance=None) -> np.ndarray | None:
    """``ValueError`` naming the argument for a bad solver setting; returns ``guidance`` as float64 NumPy
    when it is known at trace time (None when traced or not given)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}.")
    for name, value in (("num_steps", num_steps), ("num_substeps", num_substeps)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
    if not _is_int(order) or order not in (1, 2):
        raise ValueError(f"order must be 1 or 2; got {order!r}.")
    if solver != "gm-ode" and num_substeps != 1:
        raise ValueError(f"num_substeps must be 1 for solver {solver!r} (only 'gm-ode' has sub-steps).")
    g = None if guidance is None else _concrete(guidance)
    if g is not None and not np.all(np.isfinite(g)):
        raise ValueError(f"guidance must be finite; got {g}.")
    if g is not None and solver in GM_SOLVERS and not np.all((g >= 0.0) & (g < 1.0)):
        raise ValueError(f"guidance for {solver!r} is the probabilistic w̃ and must lie in [0, 1); got {g}.")
    if g is not None and solver in BASELINE_SOLVERS and not np.all(g >= 0.0):
        raise ValueError(f"guidance for {solver!r} is the CFG scale w and must be >= 0; got {g}.")
    return g


def _validate(noise, labels, solver, order, num_steps, num_substeps, guidance, null_label, spectrum_fn):
    g = check_settings(solver, order, num_steps, num_substeps, guidance)
    if noise.ndim < 2:
        raise ValueError(f"noise must have shape (N, ..., C); got {noise.shape}.")
    n = noise.shape[0]
    if jnp.ndim(guidance) not in (0, 1) or (jnp.ndim(guidance) == 1 and jnp.shape(guidance)[0] != n):
        raise ValueError(f"guidance must be a scalar or of shape (N,) = ({n},); got shape {jnp.shape(guidance)}.")
    guided = g is None or bool(np.any(g != 0.0))
    if guided and (labels is None or null_label is None):
        raise ValueError("guidance needs both labels (N,) and null_label (the index of the null class).")
    if labels is not None and jnp.shape(labels) != (n,):
        raise ValueError(f"labels must have shape (N,) = ({n},); got {jnp.shape(labels)}.")
    if spectrum_fn is not None and (solver != "gm-sde" or noise.ndim != 4):
        raise ValueError("spectrum_fn is used by 'gm-sde' on images (N, H, W, C) only.")
    return guided


def _check_denoiser_output(denoise_fn, noise, labels, guided, null_label):
    """Runs ``denoise_fn`` abstractly and checks the GM shapes; returns K."""
    n = noise.shape[0] * (2 if guided else 1)
    x = jax.ShapeDtypeStruct((n,) + noise.shape[1:], jnp.float32)
    tau = jax.ShapeDtypeStruct((n,), jnp.float32)
    lab = None if labels is None else jax.ShapeDtypeStruct((n,), jnp.asarray(labels).dtype)
    out = jax.eval_shape(denoise_fn, x, tau, lab)
    if not isinstance(out, GM):
        raise ValueError(f"denoise_fn must return a GM over u; got {type(out).__name__}.")
    means = out.means.shape
    if means[:-2] != x.shape[:-1] or means[-1] != x.shape[-1]:
        raise ValueError(f"denoise_fn returned means of shape {means}; expected (*B, K, C) with (*B, C) = {x.shape}.")
    check_gm_shapes(out)
    return means[-2]


def guidance_pairs(a: Array, b: Array) -> Array:
    """``(2N, ...)`` with rows ``2i, 2i+1 = a[i], b[i]``: each example's conditional and unconditional
    inputs side by side. A batch sharded over devices keeps both halves of a pair on its example's device,
    where ``concatenate([a, b])`` would move half of every shard to another device (on a v5p-8 FSDP mesh
    that made a guided teacher forward cost 2.6× two plain ones)."""
    return jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])


def split_pairs(tree):
    """The inverse of ``guidance_pairs`` on every leaf (leading axis ``2N``): ``(even rows, odd rows)``."""
    pairs = jax.tree.map(lambda a: a.reshape(-1, 2, *a.shape[1:]), tree)
    return jax.tree.map(lambda a: a[:, 0], pairs), jax.tree.map(lambda a: a[:, 1], pairs)


class _Denoiser:
    """Evaluates the network at one noise level and returns x0-GMs (conditional, unconditional)."""

    def __init__(self, denoise_fn, labels, guided, null_label):
        self.fn, self.labels, self.guided, self.null_label = denoise_fn, labels, guided, null_label

    def __call__(self, x: Array, sigma: Array) -> tuple[GM, GM | None]:
        if self.guided:
            x_in = guidance_pairs(x, x)
            labels = guidance_pairs(self.labels, jnp.full_like(self.labels, self.null_label))
        else:
            x_in, labels = x, self.labels
        tau = jnp.full((x_in.shape[0],), to_tau(sigma), jnp.float32)
        gm_u = as_float32(self.fn(x_in, tau, labels))
        gm_u = gm_u._replace(logstds=jnp.broadcast_to(gm_u.logstds, gm_u.means.shape[:-2] + (1, 1)))
        gm = u_to_x0(gm_u, x_in, sigma)
        if not self.guided:
            return gm, None
        return split_pairs(gm)


def probabilistic_guidance(gm_c: GM, gm_u: GM, w: Array, orthogonal) -> tuple[GM, Gaussian, Gaussian, Array]:
    """method.md §7.2. Returns (guided GM, G*, G_c with per-sample var, the bias Δ)."""
    mu_u = gm_mean(gm_u)
    iso = gm_to_iso_gaussian(gm_c)
    g_c = Gaussian(iso.mean, _pixel_mean(iso.var))
    delta = _project_out(iso.mean - mu_u, iso.mean, orthogonal)
    delta = w * delta * jnp.sqrt(g_c.var / jnp.maximum(_pixel_mean(delta * delta), EPS))
    g_star = Gaussian(iso.mean + delta, (1.0 - w**2) * g_c.var)
    guided = gm_mul_iso_gaussian(gm_c, iso_gaussian_mul_iso_gaussian(g_star, g_c, 1.0, -1.0))
    return guided, g_star, g_c, delta


def _second_order(gm_now, base_gm, base_g, delta, prev, x, sigma, h, w):
    """method.md §7.3: the GM and G after the second-order correction."""
    prev_gm, prev_x, prev_sigma, prev_h = prev
    mu_prev = gm_mean(convert_denoising_gm(prev_gm, prev_x, prev_sigma, x, sigma))
    vbar = base_g.var
    rho = vbar * (w**2 + 0.005)
    corr = 0.5 * (h / prev_h) * (gm_mean(gm_now) - mu_prev) * jnp.sqrt(jnp.maximum(0.0, 1.0 - rho / prev_h**2))
    b = corr + delta
    power = _pixel_mean(b * b)
    b = b * jnp.sqrt(jnp.minimum(1.0, vbar / jnp.maximum(power, EPS)))
    g_star = Gaussian(base_g.mean + b, base_g.var * jnp.maximum(EPS, 1.0 - power / jnp.maximum(vbar, EPS)))
    gm = gm_mul_iso_gaussian(base_gm, iso_gaussian_mul_iso_gaussian(g_star, base_g, 1.0, -1.0))
    return gm, g_star


def _select(pred, a, b):
    return jax.tree.map(lambda u, v: jnp.where(pred, u, v), a, b)


def _gm_solver(denoiser, x, key, sigmas, *, sde, order, num_steps, num_substeps, w, orthogonal, spectrum_fn, k):
    n_sub = num_substeps
    batch = x.shape[:-1]
    means_shape = batch + (k, x.shape[-1])
    init_prev = (
        GM(jnp.zeros(means_shape), jnp.zeros(means_shape[:-1]), jnp.zeros(batch + (1, 1))),
        jnp.zeros_like(x),
        jnp.float32(1.0),
        jnp.float32(1.0),
    )
    fine = sigmas[:-1].reshape(num_steps, n_sub)
    nxt = jnp.concatenate([fine[1:, :1], jnp.zeros((1, 1))], axis=0)
    fine = jnp.concatenate([fine, nxt], axis=1)  # (N_steps, n_sub + 1): σ at each sub-step boundary

    def step(carry, xs):
        x, prev = carry
        i, sig = xs
        sigma, h = sig[0], sig[0] - sig[-1]
        gm_c, gm_u = denoiser(x, sigma)
        if gm_u is not None:
            gm, g, base_g, delta = probabilistic_guidance(gm_c, gm_u, w, orthogonal)
            base_gm = gm_c
        else:
            gm = gm_c
            g = gm_to_iso_gaussian(gm)
            base_g, base_gm, delta = Gaussian(g.mean, _pixel_mean(g.var)), gm, 0.0
        new_prev = (gm, x, sigma, h)
        if order == 2:
            gm2, g2 = _second_order(gm, base_gm, base_g, delta, prev, x, sigma, h, w)
            gm, g = _select(i > 0, (gm2, g2), (gm, g))
        if sde:
            x0_key, noise_key = jax.random.split(jax.random.fold_in(key, i))
            if spectrum_fn is not None:
                x0 = spectral_sample(x0_key, gm, spectrum_fn(g))
            else:
                x0 = gm_sample(x0_key, gm)
            c1, c2, c3 = transition_coefs(sig[0], sig[1], x.ndim)
            noise = jax.random.normal(noise_key, x.shape, jnp.float32)
            x_new = c1 * x + c2 * x0 + jnp.sqrt(c3) * noise
        else:
            x_new = x + (sig[1] - sig[0]) * (x - gm_mean(gm)) / sig[0]

            def substep(j, x_cur):
                sig_a, sig_b = sig[j], sig[j + 1]
                x0 = gm_mean(convert_denoising_gm(gm, x, sigma, x_cur, sig_a))
                return x_cur + (sig_b - sig_a) * (x_cur - x0) / sig_a

            if n_sub > 1:
                x_new = jax.lax.fori_loop(1, n_sub, substep, x_new)
        return (x_new, new_prev), None

    (x, _), _ = jax.lax.scan(step, (x, init_prev), (jnp.arange(num_steps), fine))
    return x


def cfg_x0(x: Array, sigma, gm_c: GM, gm_u: GM | None, w, orthogonal) -> Array:
    """Classifier-free guidance on the velocity, as the authors' baselines (method.md §7.5): the x0 mean
    ``x − σ (u_c + (w − 1) b)`` with the bias ``b = u_c − u_u`` minus ``orthogonal`` times its component
    along the conditional velocity mean ``u_c`` (per sample). ``w = 0`` is no guidance, like ``w = 1``."""
    mu_c = gm_mean(gm_c)
    if gm_u is None:
        return mu_c
    u_c, u_u = (x - mu_c) / sigma, (x - gm_mean(gm_u)) / sigma
    bias = _project_out(u_c - u_u, u_c, orthogonal)
    return mu_c - sigma * jnp.where(w == 0.0, 0.0, w - 1.0) * bias


def _baseline_solver(denoiser, x, key, sigmas, *, solver, num_steps, w, orthogonal, ddpm_variance):
    def log_snr(s):
        return jnp.log(1.0 - s) - jnp.log(s)

    def step(carry, xs):
        x, prev_x0, prev_h = carry
        i, sig_a, sig_b = xs
        gm_c, gm_u = denoiser(x, sig_a)
        x0 = cfg_x0(x, sig_a, gm_c, gm_u, w, orthogonal)
        h = log_snr(sig_b) - log_snr(sig_a)
        if solver == "euler":
            x_new = x + (sig_b - sig_a) * (x - x0) / sig_a
        elif solver == "ddpm":
            c1, c2, c3 = transition_coefs(sig_a, sig_b, x.ndim)
            if ddpm_variance == "large":  # DDPM's β_t, rescaled from the VP path to this one
                a_a, a_b = 1.0 - sig_a, 1.0 - sig_b
                b = 1.0 - ((sig_b / sig_a) * (a_a / a_b)) ** 2
                c3 = b * sig_a**2 * (a_b**2 + sig_b**2) / (a_a**2 + sig_a**2)
                c3 = jnp.where(sig_b > 0, c3, 0.0)
            noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
            x_new = c1 * x + c2 * x0 + jnp.sqrt(c3) * noise
        else:  # DPM-Solver++(2M), data prediction, first order on the first and last step
            half_inv_r = jnp.where((i > 0) & (sig_b > 0), h / (2.0 * prev_h), 0.0)
            d = (1.0 + half_inv_r) * x0 - half_inv_r * prev_x0
            a_a, a_b = 1.0 - sig_a, 1.0 - sig_b
            x_new = (sig_b / sig_a) * x + (a_b - sig_b * a_a / sig_a) * d
        return (x_new, x0, h), None

    xs = (jnp.arange(num_steps), sigmas[:-1], sigmas[1:])
    (x, _, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x), jnp.float32(1.0)), xs)
    return x


def _unipc_coefs(h: Array) -> tuple[Array, Array, Array]:
    """method.md §7.6: φ = e^(−h) − 1 and the bh2 weights b1, b2 (finite for h = ∞)."""
    phi = jnp.expm1(-h)
    g = phi / -h - 1.0
    return phi, g / phi, 2.0 * (g / -h - 0.5) / phi


def _unipc_solver(denoiser, x, sigmas, *, num_steps, w, orthogonal):
    """UniPC-2M (bh2, data prediction) as the authors' FlowAdapter runs diffusers' ``UniPCMultistepScheduler``
    (method.md §7.6): the corrector refines each step's start with the network's x0 at that start, the
    predictor is of order 2 except on the first and the last step."""
    alphas = 1.0 - sigmas
    lam = jnp.log(jnp.maximum(alphas, ADAPTER_EPS)) - jnp.log(sigmas)  # λ(0) = ∞
    lam_pad = jnp.concatenate([lam[:1] - 2.0, lam[:1] - 1.0, lam])  # λ_{i−2}, λ_{i−1} for i < 2: unused, finite
    sig_pad = jnp.concatenate([sigmas[:1], sigmas])
    last = num_steps - 1

    def step(carry, xs):
        x, x_last, m1, m2 = carry  # x: the predictor's output, x_last: the previous step's (corrected) start
        i, lam_2, lam_1, lam_0, lam_n, sig_1, sig_0, sig_n = xs
        gm_c, gm_u = denoiser(x, sig_0)
        m0 = cfg_x0(x, sig_0, gm_c, gm_u, w, orthogonal)
        m0 = jnp.where(1.0 - sig_0 < ADAPTER_EPS, 0.0, m0)  # the adapter's ε at σ = 1 holds no network output
        # corrector (UniC) of the step σ_{i−1} → σ_i, of the order that step's predictor had
        phi, b1, b2 = _unipc_coefs(lam_0 - lam_1)
        second = i >= 2
        r = jnp.where(second, (lam_2 - lam_1) / (lam_0 - lam_1), -1.0)
        rho_prev = jnp.where(second, (b1 - b2) / (1.0 - r) / r, 0.0)
        rho_now = jnp.where(second, (b2 - r * b1) / (1.0 - r), 0.5)
        corrected = (sig_0 / sig_1) * x_last - (1.0 - sig_0) * phi * (m1 + rho_prev * (m2 - m1) + rho_now * (m0 - m1))
        x = jnp.where(i > 0, corrected, x)
        # predictor (UniP) σ_i → σ_{i+1}
        phi, _, _ = _unipc_coefs(lam_n - lam_0)
        c = jnp.where((i > 0) & (i < last), 0.5 * (lam_n - lam_0) / (lam_1 - lam_0), 0.0)
        x_new = (sig_n / sig_0) * x - (1.0 - sig_n) * phi * (m0 + c * (m1 - m0))
        return (x_new, x, m0, m1), None

    n = num_steps
    xs = (jnp.arange(n), lam_pad[:n], lam_pad[1 : n + 1], lam[:n], lam[1:], sig_pad[:n], sigmas[:n], sigmas[1:])
    zeros = jnp.zeros_like(x)
    (x, _, _, _), _ = jax.lax.scan(step, (x, x, zeros, zeros), xs)
    return x


def sample(
    denoise_fn: DenoiseFn,
    noise: Array,
    labels: Array | None = None,
    *,
    key: Array,
    solver: str = "gm-ode",
    order: int = 2,
    num_steps: int = 8,
    num_substeps: int = 1,
    guidance=0.0,
    orthogonal=None,
    null_label: int | None = None,
    shift: float = 1.0,
    spectrum_fn: Callable[[Gaussian], Array] | None = None,
    ddpm_variance: str = "small",
) -> Array:
    """Draws x0 (N, ..., C) from ``noise`` at t = 1 with ``num_steps`` network evaluations.

    ``denoise_fn(x_t, tau, labels) -> GM`` over u, with ``tau = 1000 σ`` of shape (N,).
    ``guidance``: probabilistic ``w̃ ∈ [0, 1)`` for 'gm-ode'/'gm-sde', the CFG scale
    ``w`` for 'euler'/'ddpm'/'dpmpp-2m'/'unipc'; 0 switches guidance off (the network then runs
    once per step). ``orthogonal`` (traceable, in [0, 1]) scales the projection of the guidance bias:
    for GM solvers off the conditional x0 mean (§7.2), for baselines off the conditional velocity
    mean (§7.5); None takes ``default_orthogonal(solver)`` (1 for GM solvers, 0 = plain CFG for
    baselines, as the authors'). ``order`` applies to GM solvers, ``num_substeps`` to 'gm-ode',
    ``spectrum_fn(G) -> log spectrum (N, H, W, C)`` to 'gm-sde' on images,
    ``ddpm_variance`` ('small' or 'large') to 'ddpm'.
    """
    noise = jnp.asarray(noise)
    guided = _validate(noise, labels, solver, order, num_steps, num_substeps, guidance, null_label, spectrum_fn)
    if orthogonal is None:
        orthogonal = default_orthogonal(solver)
    if ddpm_variance not in ("small", "large"):
        raise ValueError(f"ddpm_variance must be 'small' or 'large'; got {ddpm_variance!r}.")
    k = _check_denoiser_output(denoise_fn, noise, labels, guided, null_label)
    x = noise.astype(jnp.float32)
    w = per_sample(guidance, x.ndim) if guided else jnp.float32(0.0)
    denoiser = _Denoiser(denoise_fn, labels, guided, null_label)
    sigmas = time_grid(num_steps * num_substeps, shift)
    if solver in GM_SOLVERS:
        return _gm_solver(
            denoiser,
            x,
            key,
            sigmas,
            sde=solver == "gm-sde",
            order=order,
            num_steps=num_steps,
            num_substeps=num_substeps,
            w=w,
            orthogonal=orthogonal,
            spectrum_fn=spectrum_fn,
            k=k,
        )
    if solver == "unipc":
        return _unipc_solver(denoiser, x, sigmas, num_steps=num_steps, w=w, orthogonal=orthogonal)
    return _baseline_solver(
        denoiser,
        x,
        key,
        sigmas,
        solver=solver,
        num_steps=num_steps,
        w=w,
        orthogonal=orthogonal,
        ddpm_variance=ddpm_variance,
    )
