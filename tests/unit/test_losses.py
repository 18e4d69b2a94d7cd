"""Training objectives (method.md §5) against scipy densities, KS tests and Monte-Carlo."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.special import expit, logit, logsumexp

from gmflow_jax import gm as G
from gmflow_jax import losses
from gmflow_jax.gm import GM

gm_nll = jax.jit(losses.gm_nll)
transition_nll = jax.jit(losses.transition_nll)
transition_pair = jax.jit(losses.transition_pair, static_argnums=3)
LOG_2PI = math.log(2 * math.pi)
KS_P_MIN = 1e-3


def _np(a) -> np.ndarray:
    return np.asarray(a, np.float64)


# --- GM NLL --------------------------------------------------------------------------------------


def test_gm_nll_is_scipy_negative_log_density(make_gm, batched_logpdf):
    rng = np.random.default_rng(0)
    means, logweights, logstds = make_gm(rng, (3, 2, 2), 5, 3, logstd=(-1.5, 0.5))
    x = 1.5 * rng.standard_normal((3, 2, 2, 3))
    got = _np(gm_nll(GM(means, logweights, logstds), x))
    ref = -batched_logpdf(means, logweights, logstds, x) - 1.5 * LOG_2PI
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_gm_nll_clamps_inverse_std(mixture_logpdf):
    """1/s is clamped ≤ 1e4: a logstd of −12 scores like s = 1e-4."""
    rng = np.random.default_rng(1)
    means = rng.standard_normal((4, 3, 2))
    logweights = np.log(np.full((4, 3), 1 / 3))
    x = means[:, 0] + 1e-4 * rng.standard_normal((4, 2))
    got = _np(gm_nll(GM(means, logweights, np.full((4, 1, 1), -12.0)), x))
    ref = np.array([-mixture_logpdf(means[i], logweights[i], 1e-4, x[i : i + 1])[0] for i in range(4)]) - LOG_2PI
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_gm_nll_with_unit_std_single_component_is_l2_loss():
    """K = 1, s = 1: the GM NLL and the L2 flow loss differ by a constant, values and gradients."""
    rng = np.random.default_rng(2)
    u = rng.standard_normal((4, 3, 5, 4))
    mu = rng.standard_normal((4, 3, 5, 4))

    def nll(m):
        return losses.gm_nll(GM(m[..., None, :], jnp.zeros(m.shape[:-1] + (1,)), jnp.zeros((4, 1, 1, 1, 1))), u)

    def l2(m):
        return losses.l2_flow_loss(m, u)

    diff = _np(nll(jnp.asarray(mu, jnp.float32))) - _np(l2(jnp.asarray(mu, jnp.float32)))
    assert np.ptp(diff) < 1e-5
    g_nll = jax.grad(lambda m: jnp.sum(nll(m)))(jnp.asarray(mu, jnp.float32))
    g_l2 = jax.grad(lambda m: jnp.sum(l2(m)))(jnp.asarray(mu, jnp.float32))
    np.testing.assert_allclose(_np(g_nll), _np(g_l2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(g_l2), mu - u, rtol=1e-5, atol=1e-6)  # d/dμ ½‖u − μ‖² = μ − u


# --- transition loss -------------------------------------------------------------------------


def test_transition_pair_lo_times_follow_spec():
    """τ_lo = max(0, min(τ(1 − λ), τ − 1e-4)), hand-computed values."""
    t = jnp.array([0.5, 0.5, 0.5, 0.9, 2e-7], jnp.float32)
    x0 = jnp.zeros((5, 2))
    for ratio, expected in [
        (0.5, [0.25, 0.25, 0.25, 0.45, 1e-7]),
        (1.0, [0.0, 0.0, 0.0, 0.0, 0.0]),
        (0.0, [0.4999999, 0.4999999, 0.4999999, 0.8999999, 1e-7]),
        (0.9, [0.05, 0.05, 0.05, 0.09, 2e-8]),
    ]:
        _, _, t_lo = losses.transition_pair(jax.random.PRNGKey(0), x0, t, ratio)
        np.testing.assert_allclose(_np(t_lo), expected, rtol=1e-5, atol=1e-9)


def test_transition_nll_at_ratio_one_is_u_nll_plus_c_log_t(make_gm, mixture_logpdf):
    """λ = 1: x_lo = x0 and the loss is the NLL of u = (x_t − x0)/t under the u-GM, plus C log t per sample."""
    rng = np.random.default_rng(3)
    n, h, w, k, c = 4, 3, 2, 4, 3
    means, logweights, logstds = make_gm(rng, (n, h, w), k, c, logstd=(-0.5, 0.0))
    x0 = rng.standard_normal((n, h, w, c))
    t = jnp.array([0.3, 0.55, 0.8, 1.0], jnp.float32)
    x_t, x_lo, t_lo = transition_pair(jax.random.PRNGKey(1), x0, t, 1.0)
    np.testing.assert_array_equal(_np(t_lo), 0.0)
    np.testing.assert_allclose(_np(x_lo), x0, rtol=1e-6, atol=1e-6)
    got = _np(transition_nll(GM(means, logweights, logstds), x_t, t, x_lo, t_lo))
    u = (_np(x_t) - x0) / _np(t)[:, None, None, None]
    ref = np.empty((n, h, w))
    for idx in np.ndindex(n, h, w):
        ref[idx] = -mixture_logpdf(means[idx], logweights[idx], np.exp(logstds[idx[0]].item()), u[idx][None])[0]
    ref = ref - 0.5 * c * LOG_2PI + c * np.log(_np(t))[:, None, None]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)


def test_transition_nll_with_oracle_is_exact_conditional_nll(gm_data):
    """With the exact u-GM of a GM data set, the loss is −log p(x_lo | x_t) (scipy), minus the 2π constant."""
    rng = np.random.default_rng(4)
    n = 300
    x0 = gm_data.sample(rng, n)
    t = jnp.asarray(rng.uniform(0.1, 1.0, n), jnp.float32)
    x_t, x_lo, t_lo = transition_pair(jax.random.PRNGKey(2), x0, t, 0.5)
    gm_u = gm_data.denoise_fn()(x_t, 1000.0 * t, None)
    got = _np(transition_nll(gm_u, x_t, t, x_lo, t_lo))
    means, logweights, std = gm_data.posterior(_np(x_t), _np(t), _np(t_lo))
    comp = stats.norm.logpdf(_np(x_lo)[:, None, :], means, std[:, None, None]).sum(-1)
    ref = -logsumexp(logweights + comp, axis=-1) - LOG_2PI
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-4)


def test_transition_pair_moments_and_markov_kernel():
    """x_lo | x0 and x_t | x0 have the path marginals; x_t | x_lo is one kernel for every x0 (Markov)."""
    n, t, ratio = 100000, 0.7, 0.5
    t_lo = t * (1 - ratio)
    x0 = np.repeat(np.array([[2.0], [-1.0]]), n // 2, axis=0)
    x_t, x_lo, t_lo_got = transition_pair(jax.random.PRNGKey(3), x0, jnp.full((n,), t), ratio)
    x_t, x_lo = _np(x_t)[:, 0], _np(x_lo)[:, 0]
    np.testing.assert_allclose(_np(t_lo_got), t_lo, rtol=1e-6)
    a = (1 - t) / (1 - t_lo)
    resid_sd = math.sqrt(t**2 - (a * t_lo) ** 2)
    for half in (slice(0, n // 2), slice(n // 2, n)):
        m = x0[half, 0]
        assert stats.kstest((x_lo[half] - (1 - t_lo) * m) / t_lo, "norm").pvalue > KS_P_MIN
        assert stats.kstest((x_t[half] - (1 - t) * m) / t, "norm").pvalue > KS_P_MIN  # x_t ~ (1−t)x0 + tε
        fit = stats.linregress(x_lo[half], x_t[half])
        # E[x_t | x_lo] = a x_lo with no x0-dependent intercept; 5 standard errors
        assert abs(fit.slope - a) < 5 * fit.stderr
        assert abs(fit.intercept) < 5 * fit.intercept_stderr
        resid = x_t[half] - fit.slope * x_lo[half] - fit.intercept
        assert abs(resid.std() / resid_sd - 1) < 5 / math.sqrt(n)  # sd of a sample sd ≈ σ / sqrt(2n)
        assert stats.kstest(resid / resid_sd, "norm").pvalue > KS_P_MIN


# --- time sampling ----------------------------------------------------------------------------


def _shifted_cdf(base_cdf, shift):
    """CDF of t' = s t / (1 + (s − 1) t) when t has CDF base_cdf (the map is increasing)."""
    return lambda tp: base_cdf(tp / (shift - (shift - 1.0) * tp))


@pytest.mark.parametrize("mode", ["uniform", "logit_normal"])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_sample_t_distribution(mode, shift):
    base = stats.uniform.cdf if mode == "uniform" else (lambda v: stats.norm.cdf(logit(np.clip(v, 1e-12, 1 - 1e-12))))
    t = _np(losses.sample_t(jax.random.PRNGKey(4), 20000, mode=mode, shift=shift))
    assert t.shape == (20000,) and t.min() >= 1e-7 and t.max() <= 1.0
    assert stats.kstest(t, _shifted_cdf(base, shift)).pvalue > KS_P_MIN
    if shift != 1.0:  # the test has power: the unshifted law is rejected
        assert stats.kstest(t, base).pvalue < 1e-6


def test_sample_t_logit_normal_median_and_quartiles():
    t = _np(losses.sample_t(jax.random.PRNGKey(5), 40000, mode="logit_normal"))
    q = np.quantile(t, [0.25, 0.5, 0.75])
    np.testing.assert_allclose(q, expit(stats.norm.ppf([0.25, 0.5, 0.75])), atol=0.01)


# --- spectral loss -------------------------------------------------------------------------------

SPEC_SHAPE = (2, 4, 6, 3, 3)  # (N, H, W, K, C)
SPEC_BASE = (8, 8)


def _spectral_problem(make_gm):
    rng = np.random.default_rng(6)
    n, h, w, k, c = SPEC_SHAPE
    means, logweights, logstds = make_gm(rng, (n, h, w), k, c, logstd=(-0.5, 0.0))
    gm_u = GM(*(jnp.asarray(a, jnp.float32) for a in (means, logweights, logstds)))
    x0 = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    t = jnp.array([0.4, 0.8], jnp.float32)
    u = jax.jit(G.gm_sample)(jax.random.PRNGKey(7), gm_u)  # so that u* = (x_t − x0)/t follows the u-GM
    x_t = x0 + t[:, None, None, None] * u
    params = {
        "w": jnp.asarray(0.3 * rng.standard_normal(c * SPEC_BASE[0] * SPEC_BASE[1]), jnp.float32),
        "b": jnp.asarray(0.5 * rng.standard_normal(c * SPEC_BASE[0] * SPEC_BASE[1]), jnp.float32),
    }
    return gm_u, x_t, x0, t, params


def _spectrum_fn(params):
    _, h, w, _, c = SPEC_SHAPE

    def fn(g):  # a tiny stand-in for the SpectrumMLP: logits depend on the Gaussian's statistics
        stat = jnp.mean(g.var, axis=tuple(range(1, g.var.ndim)))[:, None] + jnp.mean(g.mean**2, axis=(1, 2, 3))[:, None]
        return G.log_spectrum_from_logits(stat * params["w"] + params["b"], (h, w, c), SPEC_BASE)

    return fn


def test_spectral_loss_gradients_flow_only_into_spectrum_fn(make_gm):
    gm_u, x_t, x0, t, params = _spectral_problem(make_gm)

    def loss(gm_u, x_t, x0, params):
        return jnp.mean(losses.spectral_loss(gm_u, x_t, x0, t, _spectrum_fn(params)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(gm_u, x_t, x0, params)
    for g in jax.tree.leaves(grads[:3]):  # GM fields, x_t, x0
        np.testing.assert_array_equal(_np(g), 0.0)
    for g in jax.tree.leaves(grads[3]):
        assert np.all(np.isfinite(_np(g))) and np.max(np.abs(_np(g))) > 1e-4


def test_spectral_loss_is_zero_for_flat_spectrum(make_gm):
    gm_u, x_t, x0, t, _ = _spectral_problem(make_gm)
    out = jax.jit(lambda *a: losses.spectral_loss(*a, lambda g: jnp.zeros(x0.shape)))(gm_u, x_t, x0, t)
    assert out.shape == (2,)
    np.testing.assert_array_equal(_np(out), 0.0)


def test_spectral_loss_is_log_density_ratio(make_gm, kr_forward_reference):
    """Σ e = log N(z_r; 0, I) − log N(z_r; 0, diag e^L) with z_r = T(KR(u-GM, u*)), via scipy and np.fft."""
    gm_u, x_t, x0, t, params = _spectral_problem(make_gm)
    got = _np(jax.jit(lambda *a: losses.spectral_loss(*a, _spectrum_fn(params)))(gm_u, x_t, x0, t))
    t_np = _np(t)[:, None, None, None]
    u_star = (_np(x_t) - _np(x0)) / t_np
    z = kr_forward_reference(*(_np(a) for a in gm_u), u_star)  # per-channel sign is irrelevant below
    f = np.fft.fft2(z, axes=(1, 2), norm="ortho")
    z_r = f.real + f.imag
    iso = G.gm_to_iso_gaussian(gm_u)
    g_x0 = G.Gaussian(x_t - t[:, None, None, None] * iso.mean, t[:, None, None, None] ** 2 * iso.var)
    lspec = _np(_spectrum_fn(params)(g_x0))
    e = stats.norm.logpdf(z_r) - stats.norm.logpdf(z_r, scale=np.exp(lspec / 2))
    ref = e.sum(-1).mean(axis=(1, 2))
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)


# --- no NaN / Inf --------------------------------------------------------------------------------


@jax.jit
def _nll_value_and_grad(means, logweights, logstds, x):
    def total(means, logweights, logstds):
        return jnp.sum(losses.gm_nll(GM(means, logweights, logstds), x))

    return jax.value_and_grad(total, argnums=(0, 1, 2))(means, logweights, logstds)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    mean_scale=st.floats(0.0, 100.0),
    x_scale=st.floats(0.0, 1000.0),
    logstd=st.floats(-20.0, 5.0),
    logit_scale=st.floats(0.0, 30.0),
)
def test_gm_nll_and_gradient_finite(seed, mean_scale, x_scale, logstd, logit_scale):
    rng = np.random.default_rng(seed)
    means = jnp.asarray(mean_scale * rng.standard_normal((3, 64, 2)), jnp.float32)
    logits = logit_scale * rng.standard_normal((3, 64))
    logweights = jnp.asarray(logits - logsumexp(logits, -1, keepdims=True), jnp.float32)
    logstds = jnp.full((3, 1, 1), logstd, jnp.float32)
    x = jnp.asarray(x_scale * rng.standard_normal((3, 2)), jnp.float32)
    value, grads = _nll_value_and_grad(means, logweights, logstds, x)
    assert np.all(np.isfinite(_np(value)))
    for g in grads:
        assert np.all(np.isfinite(_np(g)))


# --- bad input ---------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    gm = GM(jnp.zeros((4, 3, 2)), jnp.zeros((4, 3)), jnp.zeros((4, 1, 1)))
    with pytest.raises(ValueError, match="x must have shape"):
        losses.gm_nll(gm, jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="logweights"):
        losses.gm_nll(GM(jnp.zeros((4, 3, 2)), jnp.zeros((4, 4)), jnp.zeros((4, 1, 1))), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="mode"):
        losses.sample_t(jax.random.PRNGKey(0), 4, mode="beta")
    with pytest.raises(ValueError, match="trans_ratio"):
        losses.transition_pair(jax.random.PRNGKey(0), jnp.zeros((4, 2)), jnp.full((4,), 0.5), 1.5)
