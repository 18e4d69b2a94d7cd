"""pi-Flow (docs/method.md §10): a GM policy distilled by imitation.

H. Chen et al., "pi-Flow: Policy-Based Few-Step Generation via Imitation Distillation",
arXiv:2510.14974; the authors' PyTorch code is github.com/Lakonik/piFlow
(``lakonlab/models/diffusions/piflow.py``, ``piflow_policies/gmflow.py``).

A few-step student predicts, once per step, a GM over the velocity ``u`` at ``(x_src, σ_src)``
exactly as a GMFlow network does. That GM is read as a *policy*: the velocity at any later
``(x_t, σ_t)`` of the step is the mean of the GM converted to that point (method.md §6.3), with
no further network call, and the step is an Euler rollout of that velocity over many sub-steps.
pi-ID trains the student so that its policy's velocity matches a teacher's along the policy's
own trajectory.

Times: raw ``t ∈ [0, 1]`` with noise level ``σ = s t / (1 + (s − 1) t)`` (shift ``s``,
``t_to_sigma``); the network sees ``τ = 1000 σ`` (``flow.to_tau``). Times and noise levels are
scalars or per-sample ``(N,)``. Randomness is drawn per example from one key per example,
``(N,)`` typed keys or ``(N, 2)`` raw keys, so a draw does not depend on the batch layout.
Everything is jittable; all arithmetic runs in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gmflow_jax.flow import TAU_SCALE, diffuse, per_sample, to_tau, u_to_x0
from gmflow_jax.gm import GM, as_float32, check_points, gm_mean
from gmflow_jax.randomness import per_example
from gmflow_jax.solvers import guidance_pairs, probabilistic_guidance, split_pairs

Array = jax.Array
StudentFn = Callable[[Array, Array, Array | None], GM]
TeacherFn = Callable[[Array, Array, Array | None], Array]

POLICY_EPS = 1e-6  # σ floor and d_k floor of the policy in training (the authors' GMFlowPolicy default)
SAMPLE_EPS = 1e-4  # the same floors (and the temperature floor) when sampling (the authors' test_cfg eps)
TIME_EPS = 1e-4  # segment-start clamp, final-step-scale floor, average-velocity denominator (train_cfg eps)

# fold_in tags (gmflow_jax.randomness): one per-example key serves every draw of a training step without reuse
_TAG_T, _TAG_NOISE, _TAG_DROPOUT, _TAG_GAPS = 0, 1, 2, 3


# --- time ----------------------------------------------------------------------------------------


def t_to_sigma(t, shift=1.0) -> Array:
    """``σ = s t / (1 + (s − 1) t)``, computed as ``t / (t + (1 − t)/s)`` (exactly 1 at t = 1, 0 at t = 0)."""
    t = jnp.asarray(t, jnp.float32)
    return t / (t + (1.0 - t) / shift)


def sigma_to_t(sigma, shift=1.0) -> Array:
    """The inverse of ``t_to_sigma``: ``t = σ / (s + (1 − s) σ)``, computed as ``σ / (σ + s (1 − σ))``."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return sigma / (sigma + shift * (1.0 - sigma))


def sampling_times(num_steps: int, final_step_size_scale=1.0) -> Array:
    """Raw step times ``(num_steps + 1,)``: ``linspace(1, (f − 1)/(N + f − 1), N, endpoint=False)`` clipped
    at 0, then 0 (``f`` = ``final_step_size_scale``; ``f = 1`` gives ``t_k = 1 − k/N``). Every step but the
    last spans ``1/(N − 1 + f)``, the last ``f`` times that."""
    _check_int("num_steps", num_steps)
    f = jnp.asarray(final_step_size_scale, jnp.float32)
    stop = (f - 1.0) / (num_steps + f - 1.0)
    t = 1.0 + jnp.arange(num_steps, dtype=jnp.float32) * ((stop - 1.0) / num_steps)
    return jnp.concatenate([jnp.maximum(t, 0.0), jnp.zeros((1,), jnp.float32)])


def _check_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")


# --- per-example randomness -------------------------------------------------------------------------


def _check_keys(keys) -> Array:
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
    if (typed and keys.ndim != 1) or (not typed and (keys.ndim != 2 or keys.dtype != jnp.uint32)):
        raise ValueError(
            f"keys must be one key per example: typed keys (N,) or raw uint32 keys (N, 2); got {keys.dtype} "
            f"{keys.shape}."
        )
    return keys


# --- GM operations on the policy ----------------------------------------------------------------------


def gm_temperature(gm: GM, temperature, eps: float = POLICY_EPS) -> GM:
    """Log-weights divided by ``T`` and renormalised, variances times ``T`` (``T`` floored at ``eps``;
    scalar or per-sample ``(N,)``). The same on a u-GM as on its x0-GM (the map is affine)."""
    gm = as_float32(gm)
    temp = jnp.maximum(jnp.asarray(temperature, jnp.float32), eps)
    lw = jax.nn.log_softmax(gm.logweights / per_sample(temp, gm.logweights.ndim), axis=-1)
    return GM(gm.means, lw, gm.logstds + 0.5 * jnp.log(per_sample(temp, gm.means.ndim)))


def _dropout(keys, gm: GM, p, tag: int | None) -> GM:
    n, k = gm.means.shape[0], gm.means.shape[-2]
    if jnp.shape(keys)[0] != n:
        raise ValueError(f"keys must hold one key per example, {n}; got {jnp.shape(keys)}.")

    drop = per_example(_check_keys(keys), tag=tag, draw=lambda key: jax.random.uniform(key, (k,), jnp.float32)) < p
    drop = drop & ~jnp.all(drop, axis=-1, keepdims=True)  # never all components of a sample
    drop = drop.reshape((n,) + (1,) * (gm.logweights.ndim - 2) + (k,))  # shared by the sample's pixels
    return gm._replace(logweights=jax.nn.log_softmax(jnp.where(drop, -jnp.inf, gm.logweights), axis=-1))


def gm_dropout(keys, gm: GM, p) -> GM:
    """GM dropout: each component of each sample (the first batch axis; the same for all its pixels) is
    dropped, log-weight −inf, with probability ``p``, from that sample's key; where all would drop,
    all are kept. ``p ≤ 0`` or ``p ≥ 1`` changes nothing."""
    return _dropout(keys, as_float32(gm), jnp.asarray(p, jnp.float32), None)


# --- the policy ---------------------------------------------------------------------------------


class _Policy(NamedTuple):
    """A student's GM read as a policy: its x0-GM at the source point (x_src, σ_src), laid out for the
    velocity (the K Gaussians as the minor axis) with its terms that do not depend on (x_t, σ_t)."""

    means: Array  # x0 means, channels before components: (*B, C, K)
    logweights: Array  # (*B, K)
    half_sq: Array  # ½ |μ_k|², (*B, K)
    mean_dot_src: Array  # μ_k · x_src, (*B, K)
    var: Array  # x0 variances exp(2 logstd) σ_src², (*B|1, 1)
    x_src: Array  # (*B, C)
    sigma_src: Array  # scalar or (N, 1, .., 1), broadcastable against x_src


def _make_policy(gm_u: GM, x_src: Array, sigma_src) -> _Policy:
    gm_u = as_float32(gm_u)
    x_src = check_points(gm_u, x_src, "x_src")
    gm_x0 = u_to_x0(gm_u, x_src, sigma_src)
    means = jnp.swapaxes(gm_x0.means, -1, -2)
    return _Policy(
        means,
        gm_x0.logweights,
        0.5 * jnp.sum(means * means, axis=-2),
        jnp.sum(means * x_src[..., None], axis=-2),
        jnp.exp(2.0 * gm_x0.logstds)[..., 0],
        x_src,
        per_sample(sigma_src, x_src.ndim),
    )


def _velocity(policy: _Policy, x: Array, sigma: Array, eps: float) -> Array:
    """The policy's velocity at (x (*B, C), σ broadcastable against x): method.md §6.3 in precision form
    followed by the mean. With ``a = (1 − σ)/σ`` the ratio ``p(x | x0)/p(x_src | x0)`` is the Gaussian
    in x0 of precision ``ζ = a² − a_src²`` and precision-times-mean ``ν = a x/σ − a_src x_src/σ_src``;
    the variance ``v`` is shared by the components, so the converted means ``(v ν + μ_k)/d``,
    ``d = v ζ + 1``, average to ``(v ν + Σ_k w_k μ_k)/d`` with the converted weights
    ``w ∝ exp(log w_k + (μ_k·ν − ζ |μ_k|²/2)/d)``: per call two products over the channels and one
    softmax over K, on arrays with K minor."""
    s_src, s = jnp.maximum(policy.sigma_src, eps), jnp.maximum(sigma, eps)
    a_src, a = (1.0 - s_src) / s_src, (1.0 - s) / s
    zeta = a * a - a_src * a_src  # broadcastable against (*B, C) and (*B, K)
    nu = a * x / s - a_src * policy.x_src / s_src  # (*B, C)
    d = jnp.maximum(policy.var * zeta + 1.0, eps)
    mean_dot_nu = (a / s) * jnp.sum(policy.means * x[..., None], axis=-2) - (a_src / s_src) * policy.mean_dot_src
    logits = policy.logweights + (mean_dot_nu - zeta * policy.half_sq) / d  # (*B, K)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    mixed = jnp.sum(policy.means * e[..., None, :], axis=-1) / jnp.sum(e, axis=-1, keepdims=True)  # (*B, C)
    x0 = (policy.var * nu + mixed) / d
    return (x - x0) / s


def policy_velocity(gm_u: GM, x_src: Array, sigma_src, x_t: Array, sigma_t, *, eps: float = POLICY_EPS) -> Array:
    """The velocity ``u (*B, C)`` at ``(x_t, σ_t)`` of the policy given by the u-GM ``gm_u`` predicted at
    ``(x_src, σ_src)``: ``(x_t − E[x0 | x_t]) / max(σ_t, eps)`` with the posterior mean of the x0-GM
    converted from the source to ``(x_t, σ_t)`` (method.md §10). At the source it is the GM's mean."""
    policy = _make_policy(gm_u, x_src, sigma_src)
    x_t = check_points(gm_u, x_t, "x_t")
    return _velocity(policy, x_t, per_sample(sigma_t, x_t.ndim), eps)


def _rollout(policy: _Policy, x: Array, t_a, t_b, *, total_substeps: int, shift, eps: float, grad: bool):
    """Euler rollout of the policy from (x, t_a) to t_b in ``n = max(1, round((t_a − t_b) S))`` equal
    raw-time sub-steps, per sample (a sample stops after its own n); returns (x, t, σ) at the end.

    ``grad=True``: ``S`` iterations, reverse-differentiable, the policy rematerialised per sub-step (memory:
    one x per sub-step). ``grad=False``: no gradient (inputs stopped), as many iterations as the largest n.
    """
    if not grad:
        policy, x, t_a, t_b = jax.lax.stop_gradient((policy, x, t_a, t_b))
    t_a, t_b = jnp.broadcast_arrays(per_sample(t_a, x.ndim), per_sample(t_b, x.ndim))
    delta = t_a - t_b
    n = jnp.clip(jnp.round(delta * total_substeps), 1.0, float(total_substeps))
    dt = delta / n
    velocity = functools.partial(_velocity, eps=eps)
    if grad:
        velocity = jax.checkpoint(velocity)

    def substep(i, carry):
        x, t, sigma = carry
        t_new = jnp.maximum(t - dt, 0.0)
        sigma_new = t_to_sigma(t_new, shift)
        x_new = x + velocity(policy, x, sigma) * (sigma_new - sigma)
        active = i < n
        return jnp.where(active, x_new, x), jnp.where(active, t_new, t), jnp.where(active, sigma_new, sigma)

    steps = total_substeps if grad else jnp.max(n).astype(jnp.int32)
    return jax.lax.fori_loop(0, steps, substep, (x, t_a, t_to_sigma(t_a, shift)))


def _rollout_legs(policy: _Policy, x: Array, times: Array, *, total_substeps: int, shift, eps: float):
    """Detached Euler rollout of the policy from ``x`` at ``times[0]`` through ``times[1]``, .., ``times[M]``
    (``times`` (M + 1, N), non-increasing): leg m is ``_rollout`` from the exact ``times[m]`` to
    ``times[m + 1]`` in its own ``n_m`` equal sub-steps, x carried on from the leg before; all legs run in
    one loop of ``max Σ_m n_m`` iterations (not ``Σ_m max n_m``). Returns x ``(M, *x.shape)`` and σ
    ``(M, N, 1, .., 1)`` at the end of each leg."""
    policy, x, times = jax.lax.stop_gradient((policy, x, times))
    big_m = times.shape[0] - 1
    times = times.reshape(times.shape + (1,) * (x.ndim - 1))
    starts, delta = times[:-1], times[:-1] - times[1:]
    n = jnp.clip(jnp.round(delta * total_substeps), 1.0, float(total_substeps))
    dt, last = delta / n, jnp.cumsum(n, axis=0) - 1.0  # the iteration that ends leg m
    first, sigma_starts = last - n + 1.0, t_to_sigma(starts, shift)
    legs = jnp.arange(big_m, dtype=jnp.float32).reshape((big_m,) + (1,) * x.ndim)

    def substep(i, carry):
        x, t, sigma, xs, sigmas = carry
        i = jnp.asarray(i, jnp.float32)
        leg = jnp.sum(i > last, axis=0)  # the leg running now, M when all are done
        now = (legs == leg).astype(jnp.float32)
        starting = jnp.any(i == first, axis=0)
        t = jnp.where(starting, jnp.sum(now * starts, axis=0), t)
        sigma = jnp.where(starting, jnp.sum(now * sigma_starts, axis=0), sigma)
        t_new = jnp.maximum(t - jnp.sum(now * dt, axis=0), 0.0)
        sigma_new = t_to_sigma(t_new, shift)
        x_new = x + _velocity(policy, x, sigma, eps) * (sigma_new - sigma)
        active = leg < big_m
        x, t, sigma = jnp.where(active, x_new, x), jnp.where(active, t_new, t), jnp.where(active, sigma_new, sigma)
        ending = i == last
        return x, t, sigma, jnp.where(ending, x[None], xs), jnp.where(ending, sigma[None], sigmas)

    init = (x, starts[0], sigma_starts[0], jnp.zeros((big_m,) + x.shape), jnp.zeros_like(sigma_starts))
    steps = jnp.max(last[-1]).astype(jnp.int32) + 1
    _, _, _, xs, sigmas = jax.lax.fori_loop(0, steps, substep, init)
    return xs, sigmas


def _local_errors(policy, detached, x_src, t_src, gaps, teacher_fn, labels, *, total_substeps: int, shift):
    """pi-ID's squared errors ``(N, M)`` without teacher gaps and windows: the M intermediate states
    ``t_m = max(t_{m−1} − gap_m, 0)`` all lie on the detached policy's trajectory, so one rollout passes
    through them (``_rollout_legs``), the teacher sees all of them in one call (batch N·M, example-major)
    and the policy's velocity is taken at all of them at once."""
    big_m, n, nd = gaps.shape[1], x_src.shape[0], x_src.ndim
    times = [t_src]
    for m in range(big_m):
        times.append(jnp.maximum(times[-1] - gaps[:, m], 0.0))
    xs, sigmas = _rollout_legs(
        detached, x_src, jnp.stack(times), total_substeps=total_substeps, shift=shift, eps=POLICY_EPS
    )
    flat = jnp.swapaxes(xs, 0, 1).reshape((n * big_m,) + x_src.shape[1:])
    tau = to_tau(jnp.swapaxes(sigmas.reshape(big_m, n), 0, 1).reshape(n * big_m))
    target = teacher_fn(flat, tau, None if labels is None else jnp.repeat(labels, big_m, axis=0))
    target = jnp.swapaxes(jax.lax.stop_gradient(target).reshape((n, big_m) + x_src.shape[1:]), 0, 1)
    pred = _velocity(policy, xs, sigmas, POLICY_EPS)
    return jnp.mean((pred - target) ** 2, axis=tuple(range(2, nd + 1))).T


def policy_rollout(
    gm_u: GM, x_src: Array, t_src, t_dst, *, total_substeps: int = 128, shift=1.0, eps: float = POLICY_EPS
) -> Array:
    """``x`` at raw time ``t_dst`` from the policy of ``gm_u`` (predicted at ``(x_src, σ(t_src))``): Euler in
    ``n = max(1, round((t_src − t_dst) S))`` equal raw-time sub-steps, ``S = total_substeps`` (static),
    ``x ← x + u (σ(t') − σ(t))``, ``t' = max(t − (t_src − t_dst)/n, 0)``. ``t_src``, ``t_dst`` in [0, 1],
    scalars or per-sample ``(N,)`` (each sample with its own n)."""
    _check_int("total_substeps", total_substeps)
    policy = _make_policy(gm_u, x_src, t_to_sigma(t_src, shift))
    x, _, _ = _rollout(
        policy, policy.x_src, t_src, t_dst, total_substeps=total_substeps, shift=shift, eps=eps, grad=True
    )
    return x


# --- sampling ---------------------------------------------------------------------------------------


def piflow_sample(
    student_fn: StudentFn,
    noise: Array,
    labels: Array | None = None,
    *,
    num_steps: int = 1,
    total_substeps: int = 128,
    temperature=1.0,
    shift=1.0,
    final_step_size_scale=1.0,
    eps: float = SAMPLE_EPS,
) -> Array:
    """x0 ``(N, ..., C)`` from ``noise`` at t = 1 with ``num_steps`` network evaluations.

    ``student_fn(x, tau, labels) -> u-GM`` with ``tau = 1000 σ`` of shape (N,). Step k: the network at
    ``(x, t_k)`` of ``sampling_times``, the policy (at temperature ``min(T, 1)`` on all but the last step:
    the authors' policy ignores ``T ≥ 1``), a rollout to ``t_{k+1}``. Deterministic (the authors'
    ``FlowMapSDE`` with ``h = 0``). One ``lax.scan`` over the steps.
    """
    _check_int("total_substeps", total_substeps)
    times = sampling_times(num_steps, final_step_size_scale)
    temp = jnp.minimum(jnp.asarray(temperature, jnp.float32), 1.0)
    temps = jnp.concatenate([jnp.broadcast_to(temp, (num_steps - 1,)), jnp.ones((1,), jnp.float32)])
    x = jnp.asarray(noise, jnp.float32)

    def step(x, xs):
        t_a, t_b, temp = xs
        sigma = t_to_sigma(t_a, shift)
        gm_u = gm_temperature(student_fn(x, jnp.full((x.shape[0],), to_tau(sigma)), labels), temp, eps)
        policy = _make_policy(gm_u, x, sigma)
        x, _, _ = _rollout(policy, x, t_a, t_b, total_substeps=total_substeps, shift=shift, eps=eps, grad=False)
        return x, None

    x, _ = jax.lax.scan(step, x, (times[:-1], times[1:], temps))
    return x


# --- training -----------------------------------------------------------------------------------------


class Segment(NamedTuple):
    """The start of a pi-ID segment, per example: the student's input and where its step runs."""

    x_src: Array  # (N, ..., C)
    t_src: Array  # raw time (N,)
    sigma_src: Array  # σ(t_src) (N,); the student sees τ = flow.to_tau(sigma_src)
    length: Array  # raw-time length of the segment (N,)


def sample_segment(keys, nfe: int, final_step_size_scale=1.0) -> tuple[Array, Array]:
    """Segment starts ``t_src`` and lengths ``(N,)`` for an ``nfe``-step student: ``t ~ U(0, 1]`` (one
    draw per key) clamped at 1e-4, snapped up to the end of its step of ``sampling_times``:
    ``base = 1/(N − 1 + f)``, ``i = clip(⌈t/base + 1 − f⌉, 1, N)``, ``t_src = clip((i − 1 + f) base, 1e-4, 1)``;
    length ``f·base`` for ``i = 1`` (the last step), else ``base``. ``f`` is floored at 1e-4."""
    _check_int("nfe", nfe)
    f = jnp.maximum(jnp.asarray(final_step_size_scale, jnp.float32), TIME_EPS)
    base = 1.0 / (nfe - 1.0 + f)
    t = 1.0 - per_example(_check_keys(keys), tag=_TAG_T, draw=lambda k: jax.random.uniform(k, (), jnp.float32))
    i = jnp.clip(jnp.ceil(jnp.maximum(t, TIME_EPS) / base + 1.0 - f), 1.0, float(nfe))
    t_src = jnp.clip((i - 1.0 + f) * base, TIME_EPS, 1.0)
    return t_src, jnp.where(i == 1.0, f * base, base)


def segment_start(keys, x0: Array, *, nfe: int, final_step_size_scale=1.0, shift=1.0) -> Segment:
    """``sample_segment`` and ``x_src = (1 − σ_src) x0 + σ_src ε`` with ``ε`` drawn from each example's key."""
    x0 = jnp.asarray(x0, jnp.float32)
    t_src, length = sample_segment(keys, nfe, final_step_size_scale)
    noise = per_example(
        _check_keys(keys), tag=_TAG_NOISE, draw=lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32)
    )
    sigma = t_to_sigma(t_src, shift)
    return Segment(diffuse(x0, noise, sigma), t_src, sigma, length)


def _is_zero(value) -> bool:
    """True when ``value`` is known at trace time to be 0."""
    try:
        return float(value) == 0.0
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return False


def piid_loss(
    keys,
    gm_u: GM,
    x_src: Array,
    t_src,
    segment,
    teacher_fn: TeacherFn,
    labels: Array | None = None,
    *,
    num_intermediate_states: int = 2,
    gm_dropout=0.0,
    teacher_ratio=0.0,
    window_substeps: int = 0,
    total_substeps: int = 128,
    shift=1.0,
    scale=1.0,
) -> Array:
    """The pi-ID loss per example ``(N,)`` (method.md §10; the authors' ``piid_segment``).

    ``gm_u``: the student's u-GM at ``(x_src, τ = 1000 σ(t_src))``, computed by the caller from the
    network under its gradient (``segment_start`` gives ``x_src``, ``t_src``, ``σ_src`` and the segment
    length ``segment``). ``teacher_fn(x, tau, labels) -> u`` is the teacher's velocity (its output is
    not differentiated). ``keys``: one per example (the same keys as ``segment_start`` may be passed:
    different draws are folded in). ``M = num_intermediate_states`` times, from the segment start:
    roll the detached, dropped-out policy forward by a random gap to ``t_a``, take the teacher's velocity
    ``u*`` there as the target and the student policy's velocity (or, where its interval spans two or
    more sub-steps, its average velocity over a rollout with gradient) as the prediction, then move on
    with ``u*`` to ``t_b``. Loss ``scale · ½ · mean((prediction − u*)²)`` over the M predictions and
    all elements (the authors' ``DiffusionMSELoss``). The batch mean is the authors' loss.
    """
    _check_int("num_intermediate_states", num_intermediate_states)
    _check_int("window_substeps", window_substeps, minimum=0)
    _check_int("total_substeps", total_substeps)
    big_m, steps = num_intermediate_states, total_substeps
    gm_u = as_float32(gm_u)
    x_src = check_points(gm_u, x_src, "x_src")
    n, nd = x_src.shape[0], x_src.ndim
    t_src = jnp.broadcast_to(jnp.asarray(t_src, jnp.float32), (n,))
    segment = jnp.broadcast_to(jnp.asarray(segment, jnp.float32), (n,))
    r = jnp.asarray(teacher_ratio, jnp.float32)

    window = jnp.minimum(window_substeps * segment / jnp.maximum(jnp.round(segment * steps), 1.0), segment)
    span = segment - window
    uniforms = per_example(
        _check_keys(keys), tag=_TAG_GAPS, draw=lambda k: jax.random.uniform(k, (2 * big_m - 1,), jnp.float32)
    )
    student = jnp.sort(uniforms[:, :big_m], axis=-1) * ((1.0 - r) * span)[:, None]
    gap_s = jnp.diff(student, axis=-1, prepend=0.0)  # (N, M)
    teacher = jnp.sort(uniforms[:, big_m:], axis=-1)
    gap_t = jnp.diff(teacher, axis=-1, prepend=0.0, append=1.0) * (r * span)[:, None]  # (N, M)

    sigma_src = t_to_sigma(t_src, shift)
    policy = _make_policy(gm_u, x_src, sigma_src)
    detached = jax.lax.stop_gradient(
        _make_policy(_dropout(keys, gm_u, jnp.asarray(gm_dropout, jnp.float32), _TAG_DROPOUT), x_src, sigma_src)
    )
    rollout = functools.partial(_rollout, total_substeps=steps, shift=shift, eps=POLICY_EPS)
    local_only = window_substeps == 0 and _is_zero(teacher_ratio)

    if local_only:
        sq = _local_errors(policy, detached, x_src, t_src, gap_s, teacher_fn, labels, total_substeps=steps, shift=shift)
        return scale * 0.5 * jnp.mean(sq, axis=-1)
    x_last, t_last, sq = x_src, t_src, []
    for m in range(big_m):
        t_a = jnp.maximum(t_last - gap_s[:, m], 0.0)
        t_b = jnp.maximum(t_a - gap_t[:, m], 0.0)
        x_a, _, sigma_a = rollout(detached, x_last, t_last, t_a, grad=False)
        target = jax.lax.stop_gradient(teacher_fn(x_a, to_tau(sigma_a.reshape(n)), labels))
        pred = _velocity(policy, x_a, sigma_a, POLICY_EPS)
        if not local_only:
            t_end = t_b - window
            x_end, _, sigma_end = rollout(policy, x_a, t_a, t_end, grad=True)
            average = (x_a - x_end) / jnp.maximum(sigma_a - sigma_end, TIME_EPS)
            small = jnp.round((t_a - t_end) * steps) < 2.0
            pred = jnp.where(per_sample(small, nd), pred, average)
        sq.append(jnp.mean((pred - target) ** 2, axis=tuple(range(1, nd))))
        x_last = x_a + target * (per_sample(t_to_sigma(t_b, shift), nd) - sigma_a)
        t_last = t_b
    return scale * 0.5 * jnp.mean(jnp.stack(sq, axis=-1), axis=-1)


# --- teacher velocity -------------------------------------------------------------------------------


def gmflow_teacher(
    denoise_fn: StudentFn,
    *,
    guidance=0.0,
    null_label: int | None = None,
    orthogonal=1.0,
    guidance_interval=(0.0, TAU_SCALE),
    eps: float = POLICY_EPS,
) -> TeacherFn:
    """A GMFlow teacher's velocity as a ``teacher_fn(x, tau, labels) -> u``: the mean of its u-GM, or with
    probabilistic guidance ``w̃ = guidance`` (method.md §7.2, projection ``orthogonal``) where ``τ`` lies in
    ``guidance_interval`` (the authors' ``GMFlow.forward_u``): the mean of the guided x0-GM, as a velocity."""

    def teacher_fn(x: Array, tau: Array, labels: Array | None) -> Array:
        if _is_zero(guidance):
            return gm_mean(denoise_fn(x, tau, labels))
        if labels is None or null_label is None:
            raise ValueError("guidance needs both labels (N,) and null_label (the index of the null class).")
        nd = x.ndim
        sigma = jnp.asarray(tau, jnp.float32) / TAU_SCALE
        x2 = guidance_pairs(x, x)
        both = denoise_fn(x2, guidance_pairs(tau, tau), guidance_pairs(labels, jnp.full_like(labels, null_label)))
        gm_c, gm_uncond = split_pairs(u_to_x0(both, x2, guidance_pairs(sigma, sigma)))
        active = (tau >= guidance_interval[0]) & (tau <= guidance_interval[1])
        w = per_sample(jnp.where(active, guidance, 0.0), nd)
        guided, *_ = probabilistic_guidance(gm_c, gm_uncond, w, orthogonal)
        x0 = jnp.where(per_sample(active, nd), gm_mean(guided), gm_mean(gm_c))
        return (x - x0) / jnp.maximum(per_sample(sigma, nd), eps)

    return teacher_fn
