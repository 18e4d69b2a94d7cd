"""Moves between time levels (method.md §6) against the exact posteriors of a GM data distribution.

The oracle (conftest ``GMData``) is itself checked here against brute-force Bayes on a
grid, so the chain "definition -> oracle -> library" has no shared formula.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from gmflow_jax import flow
from gmflow_jax import gm as G
from gmflow_jax.gm import GM

u_to_x0 = jax.jit(flow.u_to_x0)
reverse_transition = jax.jit(flow.reverse_transition)
convert_denoising_gm = jax.jit(flow.convert_denoising_gm)
gm_mean = jax.jit(G.gm_mean)


def _np(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def _grid(lo=-5.0, hi=5.0, n=501):
    g = np.linspace(lo, hi, n)
    xx, yy = np.meshgrid(g, g, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], -1)


def _gm_moments(means, logweights, std):
    """Mean (C,) and per-axis variance (C,) of one 2-D GM."""
    w = np.exp(logweights)
    mean = w @ means
    return mean, w @ (means**2) - mean**2 + std**2


def _assert_same_gm(got: GM, means, logweights, std, atol=1e-4):
    """Compare a JAX GM with a float64 (means (n, K, C), logweights (n, K), std (n,)) component by component."""
    np.testing.assert_allclose(_np(got.means), means, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(np.exp(_np(got.logweights)), np.exp(logweights), atol=1e-5)
    s = np.exp(_np(got.logstds)).reshape(-1)
    np.testing.assert_allclose(np.broadcast_to(s, std.shape), std, rtol=1e-4)


@pytest.fixture(scope="module")
def noisy_points(gm_data):
    """x0 ~ data, t (n,) in [0.15, 0.95], x_t = (1 − t) x0 + t ε."""
    rng = np.random.default_rng(0)
    n = 200
    x0 = gm_data.sample(rng, n)
    t = rng.uniform(0.15, 0.95, n)
    return x0, t, (1.0 - t[:, None]) * x0 + t[:, None] * rng.standard_normal((n, 2))


# --- the oracle itself ------------------------------------------------------------------------


@pytest.mark.parametrize("t_hi,t_lo", [(0.5, 0.0), (0.9, 0.0), (0.2, 0.0), (0.7, 0.4), (0.95, 0.1)])
def test_oracle_posterior_matches_grid_bayes(gm_data, t_hi, t_lo):
    """p(x_lo | x_hi) ∝ p(x_lo) p(x_hi | x_lo), on a grid, from scipy densities only.

    ``p(x_lo)`` is the data mixture blurred by ``x_lo = (1 − t_lo) x0 + t_lo ε``; the
    forward kernel is ``x_hi ~ N(a x_lo, (t_hi² − a² t_lo²) I)``, ``a = (1 − t_hi)/(1 − t_lo)``,
    the Markov step that turns the marginal at t_lo into the marginal at t_hi.
    """
    pts = _grid(-4.5, 4.5, 451)
    cell = (pts[1, 1] - pts[0, 1]) ** 2
    a = (1.0 - t_hi) / (1.0 - t_lo)
    s_lo = np.hypot((1.0 - t_lo) * gm_data.std, t_lo)
    log_prior = np.log(
        sum(
            w * stats.multivariate_normal((1.0 - t_lo) * m, s_lo**2 * np.eye(2)).pdf(pts)
            for w, m in zip(gm_data.weights, gm_data.means, strict=True)
        )
    )
    for x_hi in (np.array([0.3, -0.2]), np.array([-1.0, 0.8]), np.array([1.5, 1.5])):
        post = log_prior + stats.norm.logpdf(x_hi, a * pts, np.sqrt(t_hi**2 - (a * t_lo) ** 2)).sum(-1)
        p = np.exp(post - post.max())
        p /= p.sum()
        mean_grid = p @ pts
        var_grid = p @ (pts**2) - mean_grid**2
        means, logweights, std = gm_data.posterior(x_hi[None], t_hi, t_lo)
        mean, var = _gm_moments(means[0], logweights[0], std[0])
        np.testing.assert_allclose(mean, mean_grid, atol=1e-6)
        np.testing.assert_allclose(var, var_grid, rtol=1e-5)
        # and the density itself at grid points of high, medium and low posterior mass
        idx = np.argsort(p)[[-1, -100, -2000]]
        log_q = np.log(
            sum(
                np.exp(lw) * stats.multivariate_normal(m, std[0] ** 2 * np.eye(2)).pdf(pts[idx])
                for lw, m in zip(logweights[0], means[0], strict=True)
            )
        )
        np.testing.assert_allclose(log_q, np.log(p[idx] / cell), atol=1e-4)


def test_oracle_denoiser_matches_numpy_posterior(gm_data, noisy_points):
    """The JAX oracle network, converted to x0, is the float64 exact posterior p(x0 | x_t)."""
    _, t, x_t = noisy_points
    fn = gm_data.denoise_fn()
    labels = np.arange(len(t)) % (gm_data.num_classes + 1)  # conditional and null labels
    for lab in (None, labels):
        gm_u = fn(jnp.asarray(x_t, jnp.float32), jnp.asarray(1000.0 * t, jnp.float32), lab)
        got = u_to_x0(gm_u, x_t, t)
        _assert_same_gm(got, *gm_data.posterior(x_t, t, 0.0, lab))


# --- u -> x0 ------------------------------------------------------------------------------------


def test_u_to_x0_is_change_of_variables(make_gm, mixture_logpdf):
    """If u ~ q_u then x0 = x_t − σ u has density q_u((x_t − x0)/σ) / σ^C."""
    rng = np.random.default_rng(1)
    means, logweights, logstds = make_gm(rng, (3,), 4, 2)
    x_t = rng.standard_normal((3, 2))
    sigma = np.array([0.9, 0.3, 0.05])
    out = u_to_x0(GM(means, logweights, logstds), x_t, sigma)
    for i in range(3):
        x0 = x_t[i] + sigma[i] * rng.standard_normal((50, 2))
        got = mixture_logpdf(_np(out.means[i]), _np(out.logweights[i]), np.exp(_np(out.logstds[i]).item()), x0)
        u = (x_t[i] - x0) / sigma[i]
        ref = mixture_logpdf(means[i], logweights[i], np.exp(logstds[i].item()), u) - 2 * np.log(sigma[i])
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-4)


# --- reverse transition ------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.1, 0.0])
def test_reverse_transition_is_exact_posterior(gm_data, noisy_points, ratio):
    """reverse_transition(exact p(x0 | x_t)) = exact p(x_t' | x_t), t' = ratio · t (per sample)."""
    _, t, x_t = noisy_points
    t_to = ratio * t
    m0, lw0, s0 = gm_data.posterior(x_t, t)
    got = reverse_transition(GM(m0, lw0, np.log(s0)[:, None, None]), x_t, t, t_to)
    means, logweights, std = gm_data.posterior(x_t, t, t_to)
    if ratio == 0.0:  # c3 = 0 is clamped to 1e-6 (method.md §6): the std is sqrt(s² + 1e-6)
        std = np.sqrt(std**2 + 1e-6)
    _assert_same_gm(got, means, logweights, std)


def test_reverse_transition_from_u_gm_with_scalar_sigma(gm_data):
    """The sampler's path: network u-GM -> x0-GM -> transition, with scalar noise levels."""
    rng = np.random.default_rng(2)
    t, t_to = 0.6, 0.35
    x_t = (1 - t) * gm_data.sample(rng, 64) + t * rng.standard_normal((64, 2))
    gm_u = gm_data.denoise_fn()(jnp.asarray(x_t, jnp.float32), jnp.full((64,), 1000.0 * t), None)
    got = reverse_transition(u_to_x0(gm_u, x_t, t), x_t, t, t_to)
    _assert_same_gm(got, *gm_data.posterior(x_t, t, t_to))


def test_reverse_transition_samples_match_forward_process_marginal(gm_data):
    """Monte-Carlo: x_t ~ p_t, then x_t' ~ reverse_transition; x_t' must follow p_t' (KS on projections)."""
    rng = np.random.default_rng(3)
    n, t, t_to = 20000, 0.8, 0.3
    x_t = (1 - t) * gm_data.sample(rng, n) + t * rng.standard_normal((n, 2))
    gm_u = gm_data.denoise_fn()(jnp.asarray(x_t, jnp.float32), jnp.full((n,), 1000.0 * t), None)
    x_to = _np(jax.jit(G.gm_sample)(jax.random.PRNGKey(0), reverse_transition(u_to_x0(gm_u, x_t, t), x_t, t, t_to)))
    s_to = np.hypot((1 - t_to) * gm_data.std, t_to)
    for v in (np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.6, 0.8])):
        proj = (1 - t_to) * gm_data.means @ v

        def cdf(s, proj=proj):
            return np.sum(gm_data.weights * stats.norm.cdf(s[:, None], proj, s_to), -1)

        assert stats.kstest(x_to @ v, cdf).pvalue > 1e-3


# --- denoising-GM conversion -----------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.7, 0.3, 0.05])
def test_convert_denoising_gm_is_exact_posterior(gm_data, noisy_points, ratio):
    """p(x0 | x_src) × p(x_tgt | x0)/p(x_src | x0), renormalised, = exact p(x0 | x_tgt)."""
    _, t, x_src = noisy_points
    rng = np.random.default_rng(4)
    t_tgt = ratio * t
    # x_tgt anywhere: drawn from the exact p(x_tgt | x_src) for half of the points, arbitrary for the rest
    means, logweights, std = gm_data.posterior(x_src, t, t_tgt)
    k = (np.cumsum(np.exp(logweights), -1) < rng.uniform(size=(len(t), 1))).sum(-1).clip(max=3)
    x_tgt = means[np.arange(len(t)), k] + std[:, None] * rng.standard_normal((len(t), 2))
    x_tgt[::2] = 2.0 * rng.standard_normal((len(t) // 2, 2))
    m0, lw0, s0 = gm_data.posterior(x_src, t)
    gm_x0 = GM(m0, lw0, np.log(s0)[:, None, None])
    got = convert_denoising_gm(gm_x0, x_src, t, x_tgt, t_tgt)
    _assert_same_gm(got, *gm_data.posterior(x_tgt, t_tgt), atol=3e-4)


# --- agreement with the authors' implementation ---------------------------------------------


def _official_gm(off):
    return GM(off["gm.means"], off["gm.logweights"], off["gm.logstds"])


def _assert_official_gm(got: GM, off, prefix):
    np.testing.assert_allclose(got.means, off[f"{prefix}.means"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.logweights, off[f"{prefix}.logweights"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.broadcast_to(got.logstds, off[f"{prefix}.logstds"].shape), off[f"{prefix}.logstds"], rtol=1e-5, atol=1e-6
    )


def test_official_u_to_x0(official):
    _assert_official_gm(u_to_x0(_official_gm(official), official["x"], official["sigma"]), official, "u_to_x0")


def test_official_reverse_transition(official):
    got = reverse_transition(_official_gm(official), official["x"], official["sigma"], official["sigma_to"])
    _assert_official_gm(got, official, "reverse_transition")


def test_official_convert_denoising_gm(official):
    got = convert_denoising_gm(
        _official_gm(official), official["x"], official["sigma"], official["x_tgt"], official["sigma_to"]
    )
    np.testing.assert_allclose(gm_mean(got), official["convert_denoising_gm.mean"], rtol=1e-5, atol=1e-5)


# --- bad input --------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    gm = GM(jnp.zeros((4, 3, 2)), jnp.zeros((4, 3)), jnp.zeros((4, 1, 1)))
    with pytest.raises(ValueError, match="x_t"):
        flow.u_to_x0(gm, jnp.zeros((4, 3)), 0.5)
    with pytest.raises(ValueError, match="x_t"):
        flow.reverse_transition(gm, jnp.zeros((5, 2)), 0.5, 0.2)
    with pytest.raises(ValueError, match="x_tgt"):
        flow.convert_denoising_gm(gm, jnp.zeros((4, 2)), 0.5, jnp.zeros((4, 3)), 0.2)
    with pytest.raises(ValueError, match="noise levels"):
        flow.u_to_x0(gm, jnp.zeros((4, 2)), jnp.full((4, 1), 0.5))
    with pytest.raises(ValueError, match="logweights"):
        flow.u_to_x0(GM(jnp.zeros((4, 3, 2)), jnp.zeros((4, 2)), jnp.zeros((4, 1, 1))), jnp.zeros((4, 2)), 0.5)
