"""pi-Flow (method.md §10) against the exact posteriors and flow of a GM data distribution.

The references are float64 NumPy/SciPy: the data GM's exact posteriors (conftest ``GMData``),
``solve_ivp`` of the exact probability-flow ODE ``dx/dσ = (x − E[x0 | x_σ])/σ``, and the formulas
of the schedule and the segment draw written out directly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats
from scipy.special import log_softmax

from gmflow_jax import piflow
from gmflow_jax.flow import convert_denoising_gm, u_to_x0
from gmflow_jax.gm import GM, gm_mean

policy_velocity = jax.jit(piflow.policy_velocity, static_argnames="eps")
policy_rollout = jax.jit(piflow.policy_rollout, static_argnames=("total_substeps", "eps"))
segment_start = jax.jit(piflow.segment_start, static_argnames="nfe")


def _np(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def _exact_u_gm(gm_data, x, sigma) -> GM:
    """The exact u-GM at (x (n, C), σ (n,)) from the float64 posterior p(x0 | x): u = (x − x0)/σ."""
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (len(x),))
    means, logweights, std = gm_data.posterior(x, sigma)
    return GM((x[:, None, :] - means) / sigma[:, None, None], logweights, np.log(std / sigma)[:, None, None])


def _noisy(gm_data, rng, sigma, n):
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (n,))[:, None]
    return (1.0 - sigma) * gm_data.sample(rng, n) + sigma * rng.standard_normal((n, 2))


def _flow_map(gm_data, x, sigma_a, sigma_b):
    """Exact probability-flow map from σ_a to σ_b (float64 solve_ivp); σ_b = 0 is the limit E[x0 | x_σ] at 1e-6."""
    stop = max(sigma_b, 1e-6)

    def rhs(s, y):
        pts = y.reshape(x.shape)
        return ((pts - gm_data.posterior_mean_x0(pts, s)) / s).ravel()

    sol = integrate.solve_ivp(rhs, (sigma_a, stop), x.ravel(), method="DOP853", rtol=1e-10, atol=1e-10)
    assert sol.success, sol.message
    out = sol.y[:, -1].reshape(x.shape)
    return gm_data.posterior_mean_x0(out, stop) if sigma_b == 0.0 else out


def _random_gm(rng, batch, k, c, logstds=None) -> GM:
    """Means ~ 1.5 N(0, 1), random normalised log-weights; log-stds 0 unless given."""
    means = 1.5 * rng.standard_normal(batch + (k, c))
    logweights = log_softmax(rng.standard_normal(batch + (k,)), axis=-1)
    return GM(means, logweights, np.zeros((batch[0],) + (1,) * (len(batch) + 1)) if logstds is None else logstds)


def _exact_teacher(gm_data):
    """The exact velocity E[u | x_σ] in JAX (float32): the mean of the oracle u-GM."""
    fn = gm_data.denoise_fn()
    return lambda x, tau, labels: gm_mean(fn(x, tau, labels))


# --- the policy ------------------------------------------------------------------------------------


def test_policy_velocity_is_exact_posterior_velocity(gm_data):
    """Policy of the exact u-GM at (x_src, σ_src), read at another (x_t, σ_t) anywhere (per-sample σ):
    the exact (x_t − E[x0 | x_t])/σ_t of the data distribution."""
    rng = np.random.default_rng(0)
    n = 200
    s_src = rng.uniform(0.2, 1.0, n)
    x_src = _noisy(gm_data, rng, s_src, n)
    s_t = s_src * rng.uniform(0.1, 0.95, n)
    x_t = 2.0 * rng.standard_normal((n, 2))
    x_t[::2] = _noisy(gm_data, rng, s_t[::2], n // 2)
    got = _np(policy_velocity(_exact_u_gm(gm_data, x_src, s_src), x_src, s_src, x_t, s_t))
    ref = (x_t - gm_data.posterior_mean_x0(x_t, s_t)) / s_t[:, None]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # scalar noise levels, at the source itself: the GM's mean velocity
    x_src = _noisy(gm_data, rng, 0.7, 64)
    gm_u = _exact_u_gm(gm_data, x_src, 0.7)
    got = _np(policy_velocity(gm_u, x_src, 0.7, x_src, 0.7))
    np.testing.assert_allclose(got, np.einsum("nk,nkc->nc", np.exp(gm_u.logweights), gm_u.means), atol=2e-5)


def test_policy_velocity_is_convert_denoising_gm_mean_on_images():
    """Random image GMs (N, H, W, K, C) with one std per sample: the velocity is that of the mean of
    method §6.3's conversion (flow.convert_denoising_gm); vmapping over an extra axis changes nothing."""
    rng = np.random.default_rng(1)
    n, h, w, k, c = 3, 4, 5, 6, 4
    gm_u = _random_gm(rng, (n, h, w), k, c, rng.uniform(-1.5, 0.5, (n, 1, 1, 1, 1)))
    s_src, s_t = np.array([1.0, 0.6, 0.3]), np.array([0.8, 0.2, 0.25])
    x_src, x_t = rng.standard_normal((n, h, w, c)), rng.standard_normal((n, h, w, c))
    got = _np(policy_velocity(gm_u, x_src, s_src, x_t, s_t))
    convert = jax.jit(lambda g, xs, ss, xt, st: gm_mean(convert_denoising_gm(u_to_x0(g, xs, ss), xs, ss, xt, st)))
    x0 = _np(convert(gm_u, x_src, s_src, x_t, s_t))
    ref = (x_t - x0) / s_t[:, None, None, None]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    stacked = jax.jit(jax.vmap(piflow.policy_velocity, in_axes=(0, 0, None, 0, None)))(
        jax.tree.map(lambda a: jnp.stack([a, a]), gm_u), jnp.stack([x_src, x_src]), s_src, jnp.stack([x_t, x_t]), s_t
    )
    np.testing.assert_allclose(_np(stacked), np.stack([got, got]), rtol=1e-6, atol=1e-6)


# --- rollout -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift,t_src,t_dst,tol", [(1.0, 0.8, 0.3, 0.03), (3.0, 1.0, 0.0, 0.06)])
def test_rollout_of_exact_policy_is_exact_flow_map(gm_data, shift, t_src, t_dst, tol):
    """128 sub-steps land on the exact flow map σ(t_src) → σ(t_dst) within ``tol`` (the Euler error, max
    over points); 256 halve the error (first order in the sub-step: the only error left is Euler's)."""
    rng = np.random.default_rng(2)
    s_a, s_b = float(piflow.t_to_sigma(t_src, shift)), float(piflow.t_to_sigma(t_dst, shift))
    x_src = _noisy(gm_data, rng, s_a, 12)
    gm_u = _exact_u_gm(gm_data, x_src, s_a)
    ref = _flow_map(gm_data, x_src, s_a, s_b)
    err128 = np.abs(_np(policy_rollout(gm_u, x_src, t_src, t_dst, total_substeps=128, shift=shift)) - ref).max()
    err256 = np.abs(_np(policy_rollout(gm_u, x_src, t_src, t_dst, total_substeps=256, shift=shift)) - ref).max()
    assert err128 < tol, err128
    assert 1.7 < err128 / err256 < 2.3, (err128, err256)


def test_rollout_with_per_sample_times_equals_scalar_calls(gm_data):
    """Per-sample t_src/t_dst (n = 13, 64, 1, 128, 0 → 1 sub-steps) = one scalar call per sample."""
    rng = np.random.default_rng(3)
    t_src = np.array([0.6, 1.0, 0.3, 1.0, 0.5], np.float32)
    t_dst = np.array([0.5, 0.5, 0.296, 0.0, 0.5], np.float32)
    x_src = _noisy(gm_data, rng, _np(piflow.t_to_sigma(t_src, 2.0)), 5)
    gm_u = _exact_u_gm(gm_data, x_src, _np(piflow.t_to_sigma(t_src, 2.0)))
    got = _np(policy_rollout(gm_u, x_src, t_src, t_dst, shift=2.0))
    for i in range(5):
        one = policy_rollout(
            jax.tree.map(lambda a, i=i: a[i : i + 1], gm_u), x_src[i : i + 1], t_src[i], t_dst[i], shift=2.0
        )
        np.testing.assert_allclose(got[i], _np(one)[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[4], x_src[4].astype(np.float32))  # t_src = t_dst: one sub-step of size 0


# --- pi-ID loss ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exact_student(gm_data):
    """128 examples with segment starts of a 2-step student (f = 0.5, shift 2), and the exact u-GM there."""
    n = 128
    keys = jax.random.split(jax.random.key(0), n)
    x0 = jnp.asarray(gm_data.sample(np.random.default_rng(4), n), jnp.float32)
    seg = segment_start(keys, x0, nfe=2, final_step_size_scale=0.5, shift=2.0)
    gm_u = jax.jit(gm_data.denoise_fn())(seg.x_src, 1000.0 * seg.sigma_src, None)
    return keys, seg, gm_u


def test_piid_loss_vanishes_for_exact_student(gm_data, exact_student):
    """Student = exact GM, teacher = exact velocity: loss ~0 and gradient ~0 in means, log-weights and
    log-stds (with and without GM dropout); moving the means makes both clearly non-zero."""
    keys, seg, gm_u = exact_student
    teacher = _exact_teacher(gm_data)

    @jax.jit
    def loss_and_grad(gm, dropout):
        def loss(gm):
            per_example = piflow.piid_loss(
                keys, gm, seg.x_src, seg.t_src, seg.length, teacher, gm_dropout=dropout, shift=2.0
            )
            return jnp.mean(per_example)

        return jax.value_and_grad(loss)(gm)

    for dropout in (0.0, 0.3):
        value, grad = loss_and_grad(gm_u, dropout)
        assert float(value) < 1e-8, float(value)
        assert max(float(jnp.abs(g).max()) for g in grad) < 1e-6, grad
    value, grad = loss_and_grad(gm_u._replace(means=gm_u.means + 0.1), 0.0)
    assert float(value) > 1e-3 and float(jnp.abs(grad.means).max()) > 1e-4, (value, grad)


def test_piid_loss_one_pass_equals_state_by_state(gm_data):
    """Without teacher gaps and windows the loss takes one rollout through all M states and one teacher call
    (batch N·M); a traced teacher_ratio of 0 takes the general path (a rollout, a teacher call and a
    prediction per state, moving on with the teacher's velocity over a zero gap). Same loss and gradients
    to float32 round-off, for a wrong student with dropout and a label-dependent teacher."""
    rng = np.random.default_rng(11)
    n = 32
    keys = jax.random.split(jax.random.key(7), n)
    seg = segment_start(keys, jnp.asarray(gm_data.sample(rng, n), jnp.float32), nfe=2)
    gm_u = _random_gm(rng, (n,), 6, 2, rng.uniform(-2.0, 0.5, (n, 1, 1)))
    labels = jnp.asarray(rng.integers(0, 3, n))
    exact = _exact_teacher(gm_data)

    def teacher(x, tau, labels):
        return exact(x, tau, None) + 0.1 * labels[:, None].astype(jnp.float32)

    def loss_and_grad(gm, ratio):
        def loss(gm):
            kw = dict(num_intermediate_states=3, gm_dropout=0.3, teacher_ratio=ratio, shift=2.0, scale=3.0)
            return jnp.mean(piflow.piid_loss(keys, gm, seg.x_src, seg.t_src, seg.length, teacher, labels, **kw))

        return jax.value_and_grad(loss)(gm)

    one_pass = jax.jit(lambda gm: loss_and_grad(gm, 0.0))(gm_u)  # a Python 0: known at trace time
    by_state = jax.jit(loss_and_grad)(gm_u, jnp.float32(0.0))  # traced: the general path
    assert float(one_pass[0]) > 1e-2  # a wrong student
    np.testing.assert_allclose(float(one_pass[0]), float(by_state[0]), rtol=1e-4)
    for a, b in zip(one_pass[1], by_state[1], strict=True):
        np.testing.assert_allclose(_np(a), _np(b), rtol=2e-3, atol=1e-5 * float(np.abs(_np(b)).max()))


def test_piid_loss_teacher_only_is_average_velocity_of_rollout(gm_data, exact_student):
    """teacher_ratio 1, M = 1: the student gap is 0 and the teacher's the whole segment, so the prediction is
    the policy's average velocity over its rollout across the segment, the target the teacher's velocity at
    the start: loss = scale · ½ · mean((avg − u*)²) with avg from policy_rollout."""
    keys, seg, gm_u = exact_student
    teacher = _exact_teacher(gm_data)
    loss = jax.jit(piflow.piid_loss, static_argnums=5, static_argnames="num_intermediate_states")
    got = loss(keys, gm_u, seg.x_src, seg.t_src, seg.length, teacher, num_intermediate_states=1, teacher_ratio=1.0,
               shift=2.0, scale=3.0)  # fmt: skip
    t_dst = seg.t_src - seg.length
    x_end = policy_rollout(gm_u, seg.x_src, seg.t_src, t_dst, shift=2.0)
    avg = (seg.x_src - x_end) / (seg.sigma_src - piflow.t_to_sigma(t_dst, 2.0))[:, None]
    target = teacher(seg.x_src, 1000.0 * seg.sigma_src, None)
    np.testing.assert_allclose(_np(got), 1.5 * _np(jnp.mean((avg - target) ** 2, axis=-1)), rtol=1e-4, atol=1e-7)
    assert float(jnp.mean(got)) > 1e-3  # the average velocity of a segment is not the local one


def test_piid_loss_gradients_finite_for_extreme_logstds(gm_data):
    """A random (wrong) student with log-stds in [−20, 5], one segment over all of [0, 1] (rollouts to σ = 0),
    dropout, teacher gaps and a window, or neither: loss and gradients finite."""
    rng = np.random.default_rng(5)
    logstds = np.array([-20.0, -8.0, -2.0, 0.0, 2.0, 5.0, -20.0, 5.0])
    n = len(logstds)
    gm_u = _random_gm(rng, (n,), 4, 2, logstds.reshape(n, 1, 1))
    keys = jax.random.split(jax.random.key(1), n)
    x0 = jnp.asarray(gm_data.sample(rng, n), jnp.float32)
    seg = segment_start(keys, x0, nfe=1)
    teacher = _exact_teacher(gm_data)

    def loss(gm, ratio, window):
        kw = dict(gm_dropout=0.5, teacher_ratio=ratio, window_substeps=window)
        return jnp.mean(piflow.piid_loss(keys, gm, seg.x_src, seg.t_src, seg.length, teacher, **kw))

    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
    for ratio, window in ((0.5, 3), (0.0, 0)):
        value, grad = grad_fn(gm_u, ratio, window)
        assert np.isfinite(float(value)), (ratio, window)
        for g in grad:
            assert np.all(np.isfinite(_np(g))), (ratio, window, grad)


def test_draws_per_example_do_not_depend_on_the_batch(gm_data):
    """The first examples of a batch get the same segment, noise and dropout as on their own; raw keys as typed."""
    rng = np.random.default_rng(6)
    keys = jax.random.split(jax.random.key(2), 8)
    x0 = jnp.asarray(gm_data.sample(rng, 8), jnp.float32)
    full, part = segment_start(keys, x0, nfe=3), segment_start(keys[:3], x0[:3], nfe=3)
    for a, b in zip(full, part, strict=True):
        np.testing.assert_array_equal(_np(a)[:3], _np(b))
    gm = _random_gm(rng, (8, 2, 2), 6, 3)
    dropout = jax.jit(piflow.gm_dropout)
    np.testing.assert_array_equal(
        _np(dropout(keys, gm, 0.5).logweights)[:3],
        _np(dropout(keys[:3], jax.tree.map(lambda a: a[:3], gm), 0.5).logweights),
    )
    raw = jax.random.key_data(keys)  # raw (N, 2) keys draw the same
    np.testing.assert_array_equal(_np(segment_start(raw, x0, nfe=3).x_src), _np(full.x_src))


# --- temperature and dropout ----------------------------------------------------------------------------


def test_temperature():
    rng = np.random.default_rng(7)
    gm = _random_gm(rng, (5, 3), 4, 2, rng.uniform(-1, 0, (5, 1, 1, 1)))
    means, logweights = gm.means, gm.logweights
    same = piflow.gm_temperature(gm, 1.0)
    for a, b in zip(same, gm, strict=True):
        np.testing.assert_allclose(_np(a), b, rtol=1e-6, atol=1e-6)
    temps = np.array([0.3, 0.5, 1.0, 2.0, 0.7])
    hot = piflow.gm_temperature(gm, temps)
    w = np.exp(logweights) ** (1.0 / temps[:, None, None])
    np.testing.assert_allclose(np.exp(_np(hot.logweights)), w / w.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        np.exp(2 * _np(hot.logstds)), np.exp(2 * gm.logstds) * temps[:, None, None, None], rtol=1e-5
    )
    np.testing.assert_array_equal(_np(hot.means), means.astype(np.float32))


@pytest.mark.parametrize("p,k", [(0.5, 2), (0.05, 32), (0.9, 3)])
def test_dropout_rate_and_never_all(p, k):
    """Each (sample, component) is dropped with probability p − p^K (p, but never all K); a sample's
    pixels share the mask; kept components keep their relative weights. Monte-Carlo over 4000 samples,
    within 5 standard errors."""
    n = 4000
    rng = np.random.default_rng(8)
    gm = _random_gm(rng, (n, 2), k, 2)
    keys = jax.random.split(jax.random.key(3), n)
    out = _np(piflow.gm_dropout(keys, gm, p).logweights)
    dropped = np.isneginf(out)
    assert np.all(dropped[:, 0] == dropped[:, 1])  # shared by the pixels of a sample
    assert not np.any(dropped.all(-1))
    expected = p - p**k
    assert abs(dropped.mean() - expected) < 5 * math.sqrt(expected * (1 - expected) / (n * k)) + 1e-9
    kept = np.where(dropped, 0.0, np.exp(gm.logweights))
    np.testing.assert_allclose(np.exp(out), kept / kept.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    for off in (0.0, 1.0):  # no-ops
        np.testing.assert_allclose(_np(piflow.gm_dropout(keys, gm, off).logweights), gm.logweights, atol=1e-6)


# --- schedule, segment draw and sampling -----------------------------------------------------------------


def test_sampling_times():
    np.testing.assert_allclose(_np(piflow.sampling_times(4)), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)
    f, n = 0.4, 3
    ref = np.append(np.linspace(1.0, (f - 1) / (n + f - 1), n, endpoint=False).clip(min=0.0), 0.0)
    np.testing.assert_allclose(_np(piflow.sampling_times(n, f)), ref, atol=1e-7)
    np.testing.assert_allclose(np.diff(ref), [-1 / (n - 1 + f)] * (n - 1) + [-f / (n - 1 + f)], atol=1e-7)
    s = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(_np(piflow.t_to_sigma(s, 3.0)), 3 * s / (1 + 2 * s), atol=1e-7)
    np.testing.assert_allclose(_np(piflow.sigma_to_t(piflow.t_to_sigma(s, 3.0), 3.0)), s, atol=1e-6)
    assert float(piflow.t_to_sigma(1.0, 0.37)) == 1.0


@pytest.mark.parametrize("nfe,f", [(4, 1.0), (3, 0.5), (1, 1.0)])
def test_segment_draw_distribution(nfe, f):
    """t_src lies on the step starts of sampling_times (but t = 0), each with the probability of its step's
    length (χ² test), with that length."""
    n = 20000
    t_src, length = piflow.sample_segment(jax.random.split(jax.random.key(4), n), nfe, f)
    t_src, length = _np(t_src), _np(length)
    grid = _np(piflow.sampling_times(nfe, f))
    starts, sizes = grid[:-1], grid[:-1] - grid[1:]
    idx = np.abs(t_src[:, None] - starts[None]).argmin(-1)
    np.testing.assert_allclose(t_src, starts[idx], atol=1e-6)
    np.testing.assert_allclose(length, sizes[idx], atol=1e-6)
    counts = np.bincount(idx, minlength=nfe)
    if nfe > 1:
        assert stats.chisquare(counts, n * sizes).pvalue > 1e-3, (counts, n * sizes)


def test_piflow_sample_follows_exact_flow(gm_data):
    """Exact student: 1 step of 128 sub-steps lands on the exact flow from noise (Euler error); 2 steps with
    temperature T are two rollouts of which only the first has T applied."""
    rng = np.random.default_rng(9)
    x1 = rng.standard_normal((64, 2))
    fn = gm_data.denoise_fn()
    sample = jax.jit(piflow.piflow_sample, static_argnums=0, static_argnames=("num_steps", "total_substeps"))
    x = _np(sample(fn, x1, num_steps=1))
    err = np.abs(x - gm_data.pf_ode(x1))
    assert err.max() < 0.03 and err.mean() < 1e-2, (err.max(), err.mean())
    x = sample(fn, x1, num_steps=2, temperature=0.6, shift=3.0, final_step_size_scale=0.5)
    t1 = float(piflow.sampling_times(2, 0.5)[1])
    gm = piflow.gm_temperature(fn(jnp.asarray(x1, jnp.float32), jnp.full((64,), 1000.0), None), 0.6, eps=1e-4)
    mid = policy_rollout(gm, x1, 1.0, t1, shift=3.0, eps=1e-4)
    gm = fn(mid, jnp.full((64,), 1000.0 * piflow.t_to_sigma(t1, 3.0)), None)
    ref = policy_rollout(gm, mid, t1, 0.0, shift=3.0, eps=1e-4)
    np.testing.assert_allclose(_np(x), _np(ref), rtol=1e-5, atol=1e-5)


# --- teacher --------------------------------------------------------------------------------------------


def test_gmflow_teacher_guidance_on_single_gaussians():
    """K = 1, no projection: the guided x0 mean is μ_c + Δ with Δ = (μ_c − μ_u) rescaled to RMS w̃ √v_c
    (method §7.2), inside the τ interval; outside, and for w̃ = 0, the plain mean velocity."""
    rng = np.random.default_rng(10)
    n, c = 4, 3
    mu = {0: rng.standard_normal((n, c)), 1: rng.standard_normal((n, c))}  # label 0 conditional, 1 null
    logstd_u = np.log(0.4)
    x = rng.standard_normal((n, c))

    def denoise(x_in, tau, labels):  # a function of each row's own inputs, as a network is: x_in's rows are x's
        i = jnp.argmin(jnp.sum((x_in[:, None, :] - jnp.asarray(x, jnp.float32)) ** 2, axis=-1), axis=1)
        means = jnp.where(
            (labels == 1)[:, None], jnp.asarray(mu[1], jnp.float32)[i], jnp.asarray(mu[0], jnp.float32)[i]
        )
        return GM(means[:, None, :], jnp.zeros((len(x_in), 1)), jnp.full((len(x_in), 1, 1), logstd_u))

    tau = np.array([900.0, 500.0, 300.0, 700.0], np.float32)
    labels = jnp.zeros((n,), jnp.int32)
    w = 0.4
    teacher = piflow.gmflow_teacher(denoise, guidance=w, null_label=1, orthogonal=0.0, guidance_interval=(0.0, 600.0))
    got = _np(jax.jit(teacher)(jnp.asarray(x, jnp.float32), jnp.asarray(tau), labels))
    sigma = tau[:, None] / 1000.0
    x0_c, x0_u = x - sigma * mu[0], x - sigma * mu[1]
    v_c = (np.exp(logstd_u) * sigma) ** 2
    delta = x0_c - x0_u
    delta = w * delta * np.sqrt(v_c / np.mean(delta**2, axis=-1, keepdims=True))
    inside = (tau <= 600.0)[:, None]
    ref = np.where(inside, (x - (x0_c + delta)) / sigma, mu[0])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    plain = piflow.gmflow_teacher(denoise)(jnp.asarray(x, jnp.float32), jnp.asarray(tau), labels)
    np.testing.assert_allclose(_np(plain), mu[0], rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_argument():
    gm = GM(jnp.zeros((4, 3, 2)), jnp.zeros((4, 3)), jnp.zeros((4, 1, 1)))
    with pytest.raises(ValueError, match="keys"):
        piflow.gm_dropout(jnp.zeros((4,), jnp.uint32), gm, 0.5)
    with pytest.raises(ValueError, match="keys"):
        piflow.gm_dropout(jax.random.split(jax.random.key(0), 3), gm, 0.5)
    with pytest.raises(ValueError, match="num_steps"):
        piflow.sampling_times(0)
    with pytest.raises(ValueError, match="nfe"):
        piflow.sample_segment(jax.random.split(jax.random.key(0), 4), 1.5)
    with pytest.raises(ValueError, match="x_src"):
        piflow.policy_velocity(gm, jnp.zeros((4, 3)), 0.5, jnp.zeros((4, 2)), 0.3)
    with pytest.raises(ValueError, match="num_intermediate_states"):
        piflow.piid_loss(
            jax.random.split(jax.random.key(0), 4), gm, jnp.zeros((4, 2)), 1.0, 1.0, None, num_intermediate_states=0
        )
