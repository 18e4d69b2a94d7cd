"""GM / Gaussian algebra, sampling, KR transport and the spectral transform (method.md §2–4).

References are float64 NumPy/SciPy (see conftest.py): scipy.stats densities and CDFs,
quadrature on grids, Monte-Carlo with stated tolerances, np.fft, and the authors'
vectors in tests/data.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.special import logsumexp, softmax

from gmflow_jax import gm as G
from gmflow_jax.gm import GM, Gaussian

KS_P_MIN = 1e-3  # deterministic seeds; a correct sampler passes with probability 0.999 per test

# jitted once per shape (eager dispatch of the KR loops is far slower on a small CPU)
gm_mean = jax.jit(G.gm_mean)
gm_to_iso_gaussian = jax.jit(G.gm_to_iso_gaussian)
gm_logprob = jax.jit(G.gm_logprob)
gm_sample = jax.jit(G.gm_sample)
gm_mul_iso_gaussian = jax.jit(G.gm_mul_iso_gaussian)
iso_gaussian_mul_iso_gaussian = jax.jit(G.iso_gaussian_mul_iso_gaussian)
gm_to_standard_normal = jax.jit(G.gm_to_standard_normal)
standard_normal_to_gm = jax.jit(G.standard_normal_to_gm)
spectral_transform = jax.jit(G.spectral_transform)


def _gm(means, logweights, logstds) -> GM:
    return GM(*(jnp.asarray(np.asarray(a), jnp.float32) for a in (means, logweights, logstds)))


def _np(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def _moments_ref(means, logweights, logstds):
    """Mixture mean and full covariance from second moments ``E[x xᵀ] − E[x] E[x]ᵀ`` (float64)."""
    means = _np(means)
    c = means.shape[-1]
    w = softmax(_np(logweights), axis=-1)
    s2 = np.broadcast_to(np.exp(2 * _np(logstds)), means.shape[:-2] + (1, 1))[..., 0, 0]
    mean = np.einsum("...k,...kc->...c", w, means)
    second = np.einsum("...k,...kc,...kd->...cd", w, means, means) + s2[..., None, None] * np.eye(c)
    return mean, second - mean[..., :, None] * mean[..., None, :]


# --- means, moment matching, log density ------------------------------------------------


def test_gm_mean_and_iso_moment_match_against_second_moments(make_gm):
    rng = np.random.default_rng(0)
    means, logweights, logstds = make_gm(rng, (2, 3, 4), 5, 3)
    gm = _gm(means, logweights, logstds)
    mean_ref, cov_ref = _moments_ref(means, logweights, logstds)
    np.testing.assert_allclose(_np(gm_mean(gm)), mean_ref, rtol=1e-5, atol=1e-5)
    iso = gm_to_iso_gaussian(gm)
    np.testing.assert_allclose(_np(iso.mean), mean_ref, rtol=1e-5, atol=1e-5)
    assert iso.var.shape == (2, 3, 4, 1)
    var_ref = np.trace(cov_ref, axis1=-2, axis2=-1)[..., None] / 3  # (1/C) E‖x − μ̄‖²
    np.testing.assert_allclose(_np(iso.var), var_ref, rtol=1e-5)


def test_moments_match_numerical_integration_2d(mixture_logpdf):
    """Mean and isotropic variance of one 2-D mixture by quadrature of its scipy density."""
    means = np.array([[-1.0, 0.5], [1.5, -0.5], [0.2, 2.0]])
    logweights = np.log([0.5, 0.3, 0.2])
    std = 0.6
    grid = np.linspace(-7.0, 7.0, 561)
    xx, yy = np.meshgrid(grid, grid, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel()], -1)
    dens = np.exp(mixture_logpdf(means, logweights, std, pts)) * (grid[1] - grid[0]) ** 2
    mean_q = dens @ pts
    var_q = dens @ np.sum((pts - mean_q) ** 2, -1) / 2
    gm = _gm(means[None], logweights[None], np.log([[[std]]]))
    np.testing.assert_allclose(_np(gm_mean(gm))[0], mean_q, atol=1e-5)
    iso = gm_to_iso_gaussian(gm)
    np.testing.assert_allclose(_np(iso.mean)[0], mean_q, atol=1e-5)
    np.testing.assert_allclose(_np(iso.var)[0, 0], var_q, rtol=1e-5)


def test_gm_logprob_against_scipy_mixture(make_gm, batched_logpdf):
    rng = np.random.default_rng(1)
    means, logweights, logstds = make_gm(rng, (3, 4), 5, 3, logstd=(-1.5, 0.5))
    x = 2.0 * rng.standard_normal((3, 4, 3))
    got = _np(gm_logprob(_gm(means, logweights, logstds), x))
    ref = batched_logpdf(means, logweights, logstds, x)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_gm_logprob_image_shaped_against_scipy(make_gm, batched_logpdf):
    rng = np.random.default_rng(2)
    means, logweights, logstds = make_gm(rng, (2, 3, 2), 4, 3)  # (N, H, W, K, C), logstds (N, 1, 1, 1, 1)
    x = rng.standard_normal((2, 3, 2, 3))
    got = _np(gm_logprob(_gm(means, logweights, logstds), x))
    np.testing.assert_allclose(got, batched_logpdf(means, logweights, logstds, x), rtol=1e-5, atol=1e-4)


def test_gm_logprob_integrates_to_one_1d():
    means = np.array([[-2.0], [0.5], [3.0]])
    logweights = np.log([0.2, 0.5, 0.3])
    grid = np.linspace(-12.0, 14.0, 26001)
    p = grid.size
    gm = _gm(np.broadcast_to(means, (p, 3, 1)), np.broadcast_to(logweights, (p, 3)), np.full((1, 1, 1), math.log(0.7)))
    dens = np.exp(_np(gm_logprob(gm, grid[:, None])))
    assert abs(np.trapezoid(dens, grid) - 1.0) < 1e-5


def test_gm_logprob_integrates_to_one_2d():
    means = np.array([[-1.0, 0.5], [1.5, -0.5], [0.2, 2.0]])
    logweights = np.log([0.5, 0.3, 0.2])
    grid = np.linspace(-5.0, 6.5, 300)
    xx, yy = np.meshgrid(grid, grid, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel()], -1)
    p = pts.shape[0]
    gm = _gm(np.broadcast_to(means, (p, 3, 2)), np.broadcast_to(logweights, (p, 3)), np.full((1, 1, 1), math.log(0.5)))
    dens = np.exp(_np(gm_logprob(gm, pts))).reshape(xx.shape)
    total = np.trapezoid(np.trapezoid(dens, grid, axis=1), grid)
    assert abs(total - 1.0) < 1e-5


# --- sampling ----------------------------------------------------------------------------


def test_gm_sample_moments_and_ks(mixture_cdf):
    means = np.array([[-2.0, 1.0], [1.0, -1.0], [2.5, 2.0]])
    logweights = np.log([0.3, 0.5, 0.2])
    std, n = 0.5, 20000
    gm = _gm(np.broadcast_to(means, (n, 3, 2)), np.broadcast_to(logweights, (n, 3)), np.full((1, 1, 1), math.log(std)))
    x = _np(gm_sample(jax.random.PRNGKey(0), gm))
    assert x.shape == (n, 2) and np.all(np.isfinite(x))
    mean_ref, cov_ref = _moments_ref(means, logweights, np.log(std))
    # mean within 4.5 standard errors; covariance entries within 4.5 (generous) standard errors
    se_mean = np.sqrt(np.diag(cov_ref) / n)
    assert np.all(np.abs(x.mean(0) - mean_ref) < 4.5 * se_mean)
    cov = np.cov(x.T)
    se_cov = np.sqrt((cov_ref**2 + np.outer(np.diag(cov_ref), np.diag(cov_ref))) / n)
    assert np.all(np.abs(cov - cov_ref) < 4.5 * se_cov)
    for c in range(2):
        p = stats.kstest(x[:, c], lambda v, c=c: mixture_cdf(means[:, c], np.exp(logweights), std, v)).pvalue
        assert p > KS_P_MIN
    # the KS test has power: a 30% wider mixture is rejected
    p_wrong = stats.kstest(x[:, 0], lambda v: mixture_cdf(means[:, 0], np.exp(logweights), 1.3 * std, v)).pvalue
    assert p_wrong < 1e-6


def test_gm_sample_image_shaped_pit(make_gm, mixture_cdf):
    """Every pixel of an (N, H, W, K, C) GM is sampled from its own mixture (pooled PIT ~ U(0, 1))."""
    rng = np.random.default_rng(3)
    means, logweights, logstds = make_gm(rng, (1, 3, 4), 3, 2)
    n = 1500
    gm = _gm(
        np.broadcast_to(means, (n, 3, 4, 3, 2)),
        np.broadcast_to(logweights, (n, 3, 4, 3)),
        np.broadcast_to(logstds, (n, 1, 1, 1, 1)),
    )
    x = _np(gm_sample(jax.random.PRNGKey(1), gm))
    std = float(np.exp(logstds.ravel()[0]))
    for c in range(2):  # each pixel's PIT under its own marginal mixture CDF, pooled over pixels
        pit = mixture_cdf(means[..., c], np.exp(logweights), std, x[..., c])
        assert stats.kstest(pit.ravel(), "uniform").pvalue > KS_P_MIN


# --- products ----------------------------------------------------------------------------


def _iso_logpdf(mean, var, x):
    """log N(x; mean, var I) for x (P, C) by scipy."""
    return stats.multivariate_normal(mean=_np(mean), cov=float(var) * np.eye(len(mean))).logpdf(x)


@pytest.mark.parametrize("p1,p2", [(1.0, 1.0), (1.0, -1.0), (0.5, 2.0), (2.0, -0.5), (1.0, 0.0)])
def test_iso_gaussian_product_is_pointwise_product(p1, p2):
    rng = np.random.default_rng(4)
    b, c = 4, 3
    m1, m2 = rng.standard_normal((b, c)), rng.standard_normal((b, c))
    v1 = rng.uniform(0.2, 0.5, (b, 1))
    v2 = rng.uniform(1.0, 3.0, (b, 1))  # v2 > v1 / 0.5 keeps the precision p1/v1 + p2/v2 positive
    out = iso_gaussian_mul_iso_gaussian(Gaussian(m1, v1), Gaussian(m2, v2), p1, p2)
    assert out.mean.shape == (b, c) and out.var.shape == (b, 1)
    for i in range(b):
        x = m1[i] + 1.5 * rng.standard_normal((200, c))
        diff = _iso_logpdf(out.mean[i], out.var[i, 0], x) - (
            p1 * _iso_logpdf(m1[i], v1[i, 0], x) + p2 * _iso_logpdf(m2[i], v2[i, 0], x)
        )
        assert np.ptp(diff) < 2e-4, (i, np.ptp(diff))


@pytest.mark.parametrize("g_power", [1.0, 0.5, 2.0, -1.0, 0.0])
def test_gm_product_is_pointwise_product(make_gm, mixture_logpdf, g_power):
    """log prod(x) − [log gm(x) + p log N(x)] is constant in x (renormalised product)."""
    rng = np.random.default_rng(5)
    means, logweights, logstds = make_gm(rng, (3,), 4, 2, spread=1.0, logstd=(-1.0, -0.5))
    g_mean = rng.standard_normal((3, 2))
    g_var = rng.uniform(1.0, 2.0, (3, 1))  # > s² so that the power -1 stays a valid Gaussian
    out = gm_mul_iso_gaussian(_gm(means, logweights, logstds), Gaussian(g_mean, g_var), 1.0, g_power)
    assert out.means.shape == (3, 4, 2) and out.logweights.shape == (3, 4)
    np.testing.assert_allclose(logsumexp(_np(out.logweights), axis=-1), 0.0, atol=1e-5)
    s_out = np.broadcast_to(np.exp(_np(out.logstds)), (3, 1, 1))
    for i in range(3):
        x = means[i, 0] + 1.5 * rng.standard_normal((300, 2))
        lhs = mixture_logpdf(_np(out.means[i]), _np(out.logweights[i]), s_out[i, 0, 0], x)
        rhs = mixture_logpdf(means[i], logweights[i], np.exp(logstds[i, 0, 0]), x) + g_power * _iso_logpdf(
            g_mean[i], g_var[i, 0], x
        )
        assert np.ptp(lhs - rhs) < 5e-4, (i, np.ptp(lhs - rhs))


def test_gm_product_image_shaped_pointwise(make_gm, mixture_logpdf):
    """(N, H, W, K, C) GM times a Gaussian with per-sample var (N, 1, 1, 1)."""
    rng = np.random.default_rng(6)
    means, logweights, logstds = make_gm(rng, (2, 2, 3), 3, 3, logstd=(-1.0, -0.5))
    g_mean = rng.standard_normal((2, 2, 3, 3))
    g_var = rng.uniform(0.5, 1.5, (2, 1, 1, 1))
    out = gm_mul_iso_gaussian(_gm(means, logweights, logstds), Gaussian(g_mean, g_var), 1.0, 0.5)
    s_out = np.broadcast_to(np.exp(_np(out.logstds)), (2, 2, 3, 1, 1))
    for idx in np.ndindex(2, 2, 3):
        x = means[idx][0] + rng.standard_normal((100, 3))
        lhs = mixture_logpdf(_np(out.means[idx]), _np(out.logweights[idx]), s_out[idx][0, 0], x)
        rhs = mixture_logpdf(means[idx], logweights[idx], np.exp(logstds[idx[0], 0, 0, 0, 0]), x)
        rhs = rhs + 0.5 * _iso_logpdf(g_mean[idx], g_var[idx[0], 0, 0, 0], x)
        assert np.ptp(lhs - rhs) < 5e-4, (idx, np.ptp(lhs - rhs))


# --- Knothe–Rosenblatt transport ------------------------------------------------------------

KR_TOY = (4000, 3, 2)  # (N, K, C): 2-D toy data, one covariance per sample
KR_IMAGE = (24, 6, 6, 4, 3)  # (N, H, W, K, C): covariance averaged over the pixels of each sample


def _well_conditioned_gm(rng, shape, shared=False):
    """A GM whose (pixel-averaged) covariance has well separated eigenvalues, so its frame is stable.

    ``shared``: the same mixture at every sample and pixel.
    """
    *batch, k, c = shape
    batch = tuple(batch)
    lead = (1,) * len(batch) if shared else batch
    means = np.broadcast_to(rng.standard_normal(lead + (k, c)) * np.array([2.0, 1.0, 0.5][:c]), batch + (k, c))
    logits = np.broadcast_to(rng.standard_normal(lead + (k,)), batch + (k,))
    logweights = logits - logsumexp(logits, axis=-1, keepdims=True)
    logstds = rng.uniform(-1.2, -0.7, (1 if shared else batch[0],) + (1,) * (len(batch) + 1))
    return means, logweights, np.broadcast_to(logstds, (batch[0],) + logstds.shape[1:])


def _z_tolerance(z_ref):
    """float32 resolves a CDF value to ~6e-8, i.e. z to ~6e-8 / φ(z): loose only deep in the tails."""
    return 2e-4 + 3e-7 / stats.norm.pdf(z_ref)


@pytest.mark.parametrize("shape", [KR_TOY, KR_IMAGE], ids=["toy", "image"])
def test_kr_forward_matches_scipy_reference(shape, kr_forward_reference):
    rng = np.random.default_rng(7)
    means, logweights, logstds = _well_conditioned_gm(rng, shape, shared=len(shape) == 3)
    gm = _gm(means, logweights, logstds)
    x = _np(gm_sample(jax.random.PRNGKey(2), gm))
    z = _np(gm_to_standard_normal(gm, x))
    z_ref = kr_forward_reference(means, logweights, logstds, x)
    assert np.all(np.abs(np.abs(z) - np.abs(z_ref)) <= _z_tolerance(z_ref))


def test_kr_frame_uses_pixel_averaged_covariance(kr_forward_reference):
    """Pixels whose own covariances disagree: only the per-sample average over pixels gives the frame."""
    rng = np.random.default_rng(8)
    n, h, w, k, c = KR_IMAGE
    means = 0.1 * rng.standard_normal(KR_IMAGE)
    half = h // 2
    means[:, :half, :, : k // 2, 0] += 2.0  # top rows: components split along axis 0 (dominant on average)
    means[:, :half, :, k // 2 :, 0] -= 2.0
    means[:, half:, :, : k // 2, 1] += 1.0  # bottom rows: split along axis 1
    means[:, half:, :, k // 2 :, 1] -= 1.0
    logweights = np.full((n, h, w, k), -math.log(k))
    logstds = np.full((n, 1, 1, 1, 1), math.log(0.4))
    gm = _gm(means, logweights, logstds)
    x = _np(gm_sample(jax.random.PRNGKey(11), gm))
    z = _np(gm_to_standard_normal(gm, x))
    z_ref = kr_forward_reference(means, logweights, logstds, x)
    assert np.all(np.abs(np.abs(z) - np.abs(z_ref)) <= _z_tolerance(z_ref))
    # control: a bottom pixel's own frame (top axis 1) gives clearly different values
    z_own = kr_forward_reference(means[:, half:, :1], logweights[:, half:, :1], logstds, x[:, half:, :1])
    assert np.max(np.abs(np.abs(z_own) - np.abs(z[:, half:, :1]))) > 0.1


@pytest.mark.parametrize("shape", [KR_TOY, KR_IMAGE], ids=["toy", "image"])
def test_kr_round_trip(shape, kr_forward_reference):
    rng = np.random.default_rng(9)
    params = _well_conditioned_gm(rng, shape, shared=len(shape) == 3)
    gm = _gm(*params)
    x = gm_sample(jax.random.PRNGKey(3), gm)
    z = gm_to_standard_normal(gm, x)
    x_back = _np(standard_normal_to_gm(gm, z))
    # x_back is a preimage of z under the exact (float64) forward map, to float32 resolution of the CDF; a
    # tolerance on x itself would have to scale with 1/density, which is large between the modes.
    z_of_back = kr_forward_reference(*params, x_back)
    assert np.all(np.abs(np.abs(z_of_back) - np.abs(_np(z))) <= _z_tolerance(z_of_back))
    assert np.median(np.abs(x_back - _np(x))) < 1e-5
    z0 = jax.random.normal(jax.random.PRNGKey(4), x.shape)
    z_back = _np(gm_to_standard_normal(gm, standard_normal_to_gm(gm, z0)))
    assert np.all(np.abs(z_back - _np(z0)) <= _z_tolerance(_np(z0)))


def test_kr_forward_maps_gm_samples_to_standard_normal_image():
    """A different GM at every pixel: the pooled KR outputs are N(0, I)."""
    rng = np.random.default_rng(10)
    gm = _gm(*_well_conditioned_gm(rng, KR_IMAGE))
    z = _np(gm_to_standard_normal(gm, gm_sample(jax.random.PRNGKey(5), gm))).reshape(-1, 3)
    for c in range(3):
        assert stats.kstest(z[:, c], "norm").pvalue > KS_P_MIN
    # uncorrelated axes: every covariance entry within 5 standard errors (≤ sqrt(2/n)) of I
    assert np.max(np.abs(np.cov(z.T) - np.eye(3))) < 5.0 * math.sqrt(2.0 / z.shape[0])


def test_kr_forward_maps_gm_samples_to_standard_normal_toy():
    rng = np.random.default_rng(11)
    gm = _gm(*_well_conditioned_gm(rng, KR_TOY, shared=True))
    z = _np(gm_to_standard_normal(gm, gm_sample(jax.random.PRNGKey(6), gm)))
    for v in (np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.6, 0.8]), np.array([0.8, -0.6])):
        assert stats.kstest(z @ v, "norm").pvalue > KS_P_MIN  # joint normality (Cramér–Wold)


def test_kr_inverse_maps_standard_normal_to_gm_toy(mixture_cdf):
    rng = np.random.default_rng(12)
    means, logweights, logstds = _well_conditioned_gm(rng, KR_TOY, shared=True)
    gm = _gm(means, logweights, logstds)
    x_kr = _np(standard_normal_to_gm(gm, jax.random.normal(jax.random.PRNGKey(7), KR_TOY[:1] + KR_TOY[2:])))
    x_direct = _np(gm_sample(jax.random.PRNGKey(8), gm))
    std, w = float(np.exp(logstds.ravel()[0])), np.exp(logweights[0])
    for v in (np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.6, 0.8]), np.array([0.8, -0.6])):
        proj = means[0] @ v  # projections of the GM are 1-D mixtures with a known CDF
        assert stats.kstest(x_kr @ v, lambda s, proj=proj: mixture_cdf(proj, w, std, s)).pvalue > KS_P_MIN
        assert stats.ks_2samp(x_kr @ v, x_direct @ v).pvalue > KS_P_MIN


def test_kr_inverse_maps_standard_normal_to_gm_image(mixture_cdf):
    """Pooled per-pixel PITs of KR-inverse samples are U(0, 1) and match those of direct samples."""
    rng = np.random.default_rng(13)
    means, logweights, logstds = _well_conditioned_gm(rng, KR_IMAGE)
    gm = _gm(means, logweights, logstds)
    x_kr = _np(standard_normal_to_gm(gm, jax.random.normal(jax.random.PRNGKey(9), KR_IMAGE[:3] + KR_IMAGE[4:])))
    x_direct = _np(gm_sample(jax.random.PRNGKey(10), gm))
    w, std = np.exp(logweights), np.exp(logstds)[:, :, :, :, 0]  # (N, H, W, K), (N, 1, 1, 1)
    for v in (np.eye(3)[0], np.eye(3)[1], np.eye(3)[2], np.ones(3) / math.sqrt(3)):
        pit_kr = mixture_cdf(means @ v, w, std, x_kr @ v).ravel()
        pit_direct = mixture_cdf(means @ v, w, std, x_direct @ v).ravel()
        assert stats.kstest(pit_kr, "uniform").pvalue > KS_P_MIN
        assert stats.ks_2samp(pit_kr, pit_direct).pvalue > KS_P_MIN


# --- spectral transform and log spectrum ----------------------------------------------------


def _hartley_ref(x):
    f = np.fft.fft2(_np(x), axes=(1, 2), norm="ortho")
    return f.real + f.imag


def test_spectral_transform_matches_numpy_fft():
    x = np.random.default_rng(14).standard_normal((2, 5, 6, 3))
    t = spectral_transform(x)
    assert t.dtype == jnp.float32 and not jnp.iscomplexobj(t)
    np.testing.assert_allclose(_np(t), _hartley_ref(x), atol=1e-5)


def test_spectral_transform_matrix_is_symmetric_orthogonal_cas():
    """The matrix of T on an (H, W) grid equals (cos θ − sin θ)/√(HW), θ = 2π(hh'/H + ww'/W)."""
    h, w = 4, 6
    basis = np.eye(h * w).reshape(h * w, h, w, 1)
    m = _np(spectral_transform(basis)).reshape(h * w, h * w)
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    theta = 2 * np.pi * (np.outer(hh.ravel(), hh.ravel()) / h + np.outer(ww.ravel(), ww.ravel()) / w)
    np.testing.assert_allclose(m, (np.cos(theta) - np.sin(theta)) / math.sqrt(h * w), atol=1e-6)
    np.testing.assert_allclose(m @ m.T, np.eye(h * w), atol=1e-5)
    np.testing.assert_allclose(m, m.T, atol=1e-6)


def test_spectral_transform_orthogonal_and_involution():
    rng = np.random.default_rng(15)
    x, y = rng.standard_normal((2, 2, 8, 5, 4))
    tx, ty = _np(spectral_transform(x)), _np(spectral_transform(y))
    axes = (1, 2, 3)
    np.testing.assert_allclose(np.sum(tx**2, axis=axes), np.sum(x**2, axis=axes), rtol=1e-5)
    np.testing.assert_allclose(np.sum(tx * ty, axis=axes), np.sum(x * y, axis=axes), atol=1e-4)
    np.testing.assert_allclose(_np(spectral_transform(tx)), x, atol=1e-5)
    # per channel: mixing channels would break this
    np.testing.assert_allclose(tx[..., 1], _hartley_ref(x[..., 1:2])[..., 0], atol=1e-5)


def _log_spectrum_ref(logits, shape, base):
    h, w, c = shape
    hb, wb = base
    grid = np.asarray(logits, np.float64).reshape(-1, c, hb, wb)  # channel-major (C, Hb, Wb)
    rows = list(range(math.ceil(h / 2))) + list(range(hb - h // 2, hb))
    cols = list(range(math.ceil(w / 2))) + list(range(wb - w // 2, wb))
    out = np.empty((grid.shape[0], h, w, c))
    for i, r in enumerate(rows):
        for j, q in enumerate(cols):
            out[:, i, j, :] = grid[:, :, r, q]
    return out - logsumexp(out, axis=(1, 2), keepdims=True) + math.log(h * w)


@pytest.mark.parametrize("shape", [(5, 6, 4), (8, 8, 4), (3, 4, 2)])
def test_log_spectrum_from_logits_against_numpy(shape):
    h, w, c = shape
    base = (8, 8)
    logits = np.random.default_rng(16).standard_normal((3, c * 64))
    lspec = _np(G.log_spectrum_from_logits(logits, shape, base))
    assert lspec.shape == (3, h, w, c)
    np.testing.assert_allclose(lspec, _log_spectrum_ref(logits, shape, base), atol=1e-5)
    np.testing.assert_allclose(np.mean(np.exp(lspec), axis=(1, 2)), 1.0, rtol=1e-5)


def test_log_spectrum_layout_is_channel_major_low_frequencies():
    """Logits encode (c, row, col) as 100c + 10row + col; L keeps their differences."""
    c, hb, wb = 2, 6, 6
    cc, rr, qq = np.meshgrid(np.arange(c), np.arange(hb), np.arange(wb), indexing="ij")
    code = (100 * cc + 10 * rr + qq).astype(np.float64) / 100.0
    lspec = _np(G.log_spectrum_from_logits(code.reshape(1, -1), (3, 4, c), (hb, wb)))
    rows, cols = [0, 1, 5], [0, 1, 4, 5]
    for ch in range(c):
        expected = np.array([[100 * ch + 10 * r + q for q in cols] for r in rows]) / 100.0
        got = lspec[0, :, :, ch]
        np.testing.assert_allclose(got - got[0, 0], expected - expected[0, 0], atol=1e-5)


def test_log_spectrum_rejects_size_above_base():
    with pytest.raises(ValueError, match="base"):
        G.log_spectrum_from_logits(np.zeros((1, 4 * 16)), (5, 4, 4), (4, 4))


# --- agreement with the authors' implementation --------------------------------------------


def _official_gm(off, prefix="gm"):
    return GM(off[f"{prefix}.means"], off[f"{prefix}.logweights"], off[f"{prefix}.logstds"])


def test_official_mean_moments_logprob(official):
    gm = _official_gm(official)
    np.testing.assert_allclose(gm_mean(gm), official["gm_mean"], rtol=1e-5, atol=1e-6)
    iso = gm_to_iso_gaussian(gm)
    np.testing.assert_allclose(iso.mean, official["gm_to_iso_gaussian.mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(iso.var, official["gm_to_iso_gaussian.var"], rtol=1e-5)
    np.testing.assert_allclose(gm_logprob(gm, official["x"]), official["gm_logprob"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("powers", [(1.0, 1.0), (1.0, 0.5)])
def test_official_gm_mul_iso_gaussian(official, powers):
    g = Gaussian(official["g.mean"], official["g.var"])
    out = gm_mul_iso_gaussian(_official_gm(official), g, *powers)
    prefix = f"gm_mul_iso_gaussian.p{powers[0]}_{powers[1]}"
    np.testing.assert_allclose(out.means, official[f"{prefix}.means"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.logweights, official[f"{prefix}.logweights"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.broadcast_to(out.logstds, official[f"{prefix}.logstds"].shape), official[f"{prefix}.logstds"], rtol=1e-5
    )


@pytest.mark.parametrize("powers", [(1.0, 1.0), (1.0, -1.0)])
def test_official_iso_gaussian_mul_iso_gaussian(official, powers):
    g1 = Gaussian(official["g.mean"], official["g.var"])
    g2 = Gaussian(official["g2.mean"], official["g2.var"])
    out = iso_gaussian_mul_iso_gaussian(g1, g2, *powers)
    prefix = f"iso_gaussian_mul_iso_gaussian.p{powers[0]}_{powers[1]}"
    np.testing.assert_allclose(out.mean, official[f"{prefix}.mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.var, official[f"{prefix}.var"], rtol=1e-5)


def test_official_kr_forward(official):
    z = gm_to_standard_normal(_official_gm(official), official["kr.x"])
    np.testing.assert_allclose(np.abs(_np(z)), official["kr.abs_z"], atol=1e-4)


# --- no NaN / Inf (hypothesis) ----------------------------------------------------------------

_K = 64


def _random_gm_np(seed, batch, mean_scale, logstd, logit_scale):
    rng = np.random.default_rng(seed)
    means = mean_scale * rng.standard_normal(batch + (_K, 3))
    logits = logit_scale * rng.standard_normal(batch + (_K,))
    logweights = logits - logsumexp(logits, axis=-1, keepdims=True)
    logstds = np.full((batch[0],) + (1,) * (len(batch) + 1), logstd)
    return means, logweights, logstds, rng


_gm_params = dict(
    seed=st.integers(0, 2**31 - 1),
    mean_scale=st.floats(0.0, 100.0),
    logstd=st.floats(-20.0, 5.0),
    logit_scale=st.floats(0.0, 30.0),
)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    **_gm_params,
    g_var_log=st.floats(-20.0, 10.0),
    g_power=st.sampled_from([1.0, 0.5, 2.0, 0.0, -1.0]),
)
def test_gm_mul_iso_gaussian_finite(seed, mean_scale, logstd, logit_scale, g_var_log, g_power):
    means, logweights, logstds, rng = _random_gm_np(seed, (2, 3), mean_scale, logstd, logit_scale)
    g_var = math.exp(g_var_log)
    if g_power < 0:  # a valid ratio needs a positive precision 1/s² + p/v: v ≥ 4 s²
        g_var = max(g_var, 4.0 * math.exp(2.0 * logstd))
    g = Gaussian(mean_scale * rng.standard_normal((2, 3, 3)), np.full((2, 1, 1), g_var))
    out = gm_mul_iso_gaussian(_gm(means, logweights, logstds), g, 1.0, g_power)
    for a in out:
        assert np.all(np.isfinite(_np(a)))


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(**_gm_params, z_scale=st.floats(0.0, 10.0))
def test_kr_transport_finite(seed, mean_scale, logstd, logit_scale, z_scale):
    means, logweights, logstds, rng = _random_gm_np(seed, (2, 2, 2), mean_scale, logstd, logit_scale)
    gm = _gm(means, logweights, logstds)
    z = jnp.asarray(z_scale * rng.standard_normal((2, 2, 2, 3)), jnp.float32)
    x = standard_normal_to_gm(gm, z)
    assert np.all(np.isfinite(_np(x)))
    assert np.all(np.isfinite(_np(gm_to_standard_normal(gm, x))))
    x_far = jnp.asarray(mean_scale * rng.standard_normal((2, 2, 2, 3)) + 1e3 * z_scale, jnp.float32)
    assert np.all(np.isfinite(_np(gm_to_standard_normal(gm, x_far))))
