"""Samplers (method.md §7) driven by the exact denoiser of a GM data distribution.

With the oracle u-GM (conftest ``GMData.denoise_fn``) the GM-SDE must draw exact data
samples and the GM-ODE must follow the exact probability-flow ODE, which scipy's
``solve_ivp`` integrates in float64.
"""

from __future__ import annotations

import dataclasses
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

from gmflow_jax import gm as G
from gmflow_jax import solvers
from gmflow_jax.gm import GM

KS_P_MIN = 1e-3
Z_MAX = 4.5  # responsibilities: |mean − weight| within 4.5 standard errors
DIRECTIONS = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.6, 0.8]), np.array([0.8, -0.6])]


def _np(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def assert_data_distribution(gm_data, x, label=None):
    """x (n, 2) ~ p(x0 | label): KS on four projections (Cramér–Wold) and the mixture weights."""
    x = _np(x)
    assert np.all(np.isfinite(x))
    for v in DIRECTIONS:
        p = stats.kstest(x @ v, lambda s, v=v: gm_data.marginal_cdf(s, v, label)).pvalue
        assert p > KS_P_MIN, (v, p)
    resp = gm_data.responsibilities(x, label)  # E[p(k | x0)] = w_k under the data law
    weights = gm_data.class_weights(label)
    se = resp.std(0) / math.sqrt(len(x))
    keep = weights > 0
    z = (resp.mean(0)[keep] - weights[keep]) / se[keep]
    assert np.all(np.abs(z) < Z_MAX), z


def _image_denoiser(fn):
    """Applies the 2-D oracle to every pixel of (N, H, W, C): pixels are i.i.d. data points."""

    def wrapped(x_t, tau, labels):
        n, h, w, c = x_t.shape
        lab = None if labels is None else jnp.repeat(labels, h * w)
        gm = fn(x_t.reshape(-1, c), jnp.repeat(tau, h * w), lab)
        k = gm.means.shape[-2]
        logstds = gm.logstds.reshape(n, h * w)[:, :1].reshape(n, 1, 1, 1, 1)  # depends on t only
        return GM(gm.means.reshape(n, h, w, k, c), gm.logweights.reshape(n, h, w, k), logstds)

    return wrapped


# --- GM-SDE draws exact samples -----------------------------------------------------------------


@pytest.mark.parametrize("label", [None, 0, 1])
def test_gm_sde_one_step_draws_exact_data_samples(gm_data, label):
    n = 20000
    noise = jax.random.normal(jax.random.PRNGKey(1), (n, 2))
    labels = None if label is None else jnp.full((n,), label)
    x = solvers.sample(gm_data.denoise_fn(), noise, labels, key=jax.random.PRNGKey(2), solver="gm-sde", num_steps=1)
    assert x.shape == (n, 2)
    assert_data_distribution(gm_data, x, label)


@pytest.mark.parametrize("order", [1, 2])
def test_gm_sde_many_steps_draws_exact_data_samples(gm_data, order):
    """An exact x0 posterior and the exact transition q(x_σ' | x_σ, x0) keep every step exact.

    Regression: the transition noise must be independent of the noise of the x0 sample (with
    ``jax_threefry_partitionable``, ``split(k)[1] == fold_in(k, 1)``; fixed in 91c8aba).
    """
    n = 20000
    noise = jax.random.normal(jax.random.PRNGKey(3), (n, 2))
    x = solvers.sample(
        gm_data.denoise_fn(), noise, key=jax.random.PRNGKey(4), solver="gm-sde", num_steps=8, order=order
    )
    assert_data_distribution(gm_data, x)


def test_gm_sde_spectral_flat_spectrum_many_steps_exact(gm_data):
    """Images of i.i.d. data pixels; a flat spectrum makes spectral sampling a plain per-pixel GM sample."""
    n, h, w = 300, 4, 4
    noise = jax.random.normal(jax.random.PRNGKey(5), (n, h, w, 2))
    x = solvers.sample(
        _image_denoiser(gm_data.denoise_fn()),
        noise,
        key=jax.random.PRNGKey(6),
        solver="gm-sde",
        num_steps=4,
        order=1,
        spectrum_fn=lambda g: jnp.zeros(noise.shape),
    )
    assert x.shape == (n, h, w, 2)
    assert_data_distribution(gm_data, _np(x).reshape(-1, 2))


# --- GM-ODE follows the exact probability-flow ODE ------------------------------------------------


@pytest.fixture(scope="module")
def ode_problem(gm_data):
    """300 starting points and their exact images under the probability-flow ODE (float64 solve_ivp)."""
    x1 = np.random.default_rng(7).standard_normal((300, 2))
    return x1, gm_data.pf_ode(x1)


def _run(gm_data, x1, **kwargs):
    noise = jnp.asarray(x1, jnp.float32)
    return _np(solvers.sample(gm_data.denoise_fn(), noise, key=jax.random.PRNGKey(0), **kwargs))


def test_gm_ode_many_substeps_matches_exact_ode(gm_data, ode_problem):
    x1, x_exact = ode_problem
    err_fine = np.abs(_run(gm_data, x1, solver="gm-ode", order=1, num_steps=2, num_substeps=256) - x_exact)
    assert err_fine.max() < 1e-2 and err_fine.mean() < 2e-3, (err_fine.max(), err_fine.mean())
    # first-order convergence in the sub-step size: halving it about halves the error
    err_coarse = np.abs(_run(gm_data, x1, solver="gm-ode", order=1, num_steps=2, num_substeps=128) - x_exact)
    assert err_fine.mean() < 0.65 * err_coarse.mean(), (err_fine.mean(), err_coarse.mean())


def test_gm_ode_order2_few_steps_close_to_exact_ode(gm_data, ode_problem):
    """4 network evaluations: GM-ODE 2 with sub-steps lands on the exact ODE; Euler/DPM++ with 4 do not."""
    x1, x_exact = ode_problem
    err = np.abs(_run(gm_data, x1, solver="gm-ode", order=2, num_steps=4, num_substeps=32) - x_exact)
    assert err.mean() < 1e-2 and err.max() < 5e-2, (err.mean(), err.max())
    for solver in ("euler", "dpmpp-2m"):
        err_base = np.abs(_run(gm_data, x1, solver=solver, num_steps=4) - x_exact)
        assert err.mean() < 0.1 * err_base.mean(), (solver, err.mean(), err_base.mean())


def test_gm_ode_order2_corrects_a_single_gaussian_denoiser(gm_data, ode_problem):
    """K = 1: the exact posterior moment-matched to one Gaussian per x_t.

    Its mean E[x0 | x_t] is exact wherever the network is evaluated, but the sub-step
    conversions of a single Gaussian are not; the second-order correction (method.md §7.3)
    must cut the resulting error against the exact ODE.
    """
    x1, x_exact = ode_problem
    exact = gm_data.denoise_fn()

    def single_gaussian(x_t, tau, labels):
        gm = exact(x_t, tau, labels)
        w = jax.nn.softmax(gm.logweights, axis=-1)
        mean = jnp.einsum("nk,nkc->nc", w, gm.means)
        spread = jnp.einsum("nk,nk->n", w, jnp.sum((gm.means - mean[:, None]) ** 2, -1)) / x_t.shape[-1]
        var = spread + jnp.exp(2.0 * gm.logstds[:, 0, 0])
        return GM(mean[:, None, :], jnp.zeros((x_t.shape[0], 1)), 0.5 * jnp.log(var)[:, None, None])

    errs = [
        np.abs(
            _np(
                solvers.sample(
                    single_gaussian,
                    jnp.asarray(x1, jnp.float32),
                    key=jax.random.PRNGKey(0),
                    solver="gm-ode",
                    order=order,
                    num_steps=8,
                    num_substeps=8,
                )
            )
            - x_exact
        ).mean()
        for order in (1, 2)
    ]
    assert errs[0] > 0.05, errs  # there is an error to correct
    assert errs[1] < 0.5 * errs[0], errs


# --- baselines converge to the data ---------------------------------------------------------------


@pytest.mark.parametrize(
    "solver,num_steps,kwargs",
    [
        ("euler", 64, {}),
        ("ddpm", 64, {}),
        ("ddpm", 64, {"ddpm_variance": "large"}),
        ("dpmpp-2m", 32, {}),
        ("unipc", 32, {}),
    ],
    ids=["euler", "ddpm-small", "ddpm-large", "dpmpp-2m", "unipc"],
)
def test_baselines_with_many_steps_reach_data_distribution(gm_data, solver, num_steps, kwargs):
    n = 4000
    noise = jax.random.normal(jax.random.PRNGKey(8), (n, 2))
    x = solvers.sample(
        gm_data.denoise_fn(), noise, key=jax.random.PRNGKey(9), solver=solver, num_steps=num_steps, **kwargs
    )
    assert_data_distribution(gm_data, x)


# --- second order with an exact denoiser; regressions found by the property tests --------------------


@pytest.mark.parametrize("std", [0.3, 1e-3], ids=["broad", "sharp"])
@pytest.mark.parametrize("solver", ["gm-ode", "gm-sde"])
def test_order2_correction_vanishes_for_exact_denoiser(gm_data, std, solver):
    """Exact posteriors convert exactly (§6), so μ_prev = μ_now, δ = 0, G* = base: order 2 equals order 1."""
    data = dataclasses.replace(gm_data, std=std)
    noise = jax.random.normal(jax.random.PRNGKey(12), (300, 2))
    first, second = (
        _np(solvers.sample(data.denoise_fn(), noise, key=jax.random.PRNGKey(13), solver=solver, order=o, num_steps=4))
        for o in (1, 2)
    )
    np.testing.assert_allclose(second, first, atol=1e-3)


@pytest.mark.parametrize("shift", [3.0, 0.2, 0.01])
def test_dpmpp_2m_finite_with_shifted_grid(gm_data, shift):
    noise = jax.random.normal(jax.random.PRNGKey(14), (64, 2))
    x = solvers.sample(gm_data.denoise_fn(), noise, key=jax.random.PRNGKey(15), solver="dpmpp-2m", shift=shift)
    assert np.all(np.isfinite(_np(x)))


def test_gm_sde_spectral_order2_finite_for_sharp_gm():
    """A network that predicts one sharp component (logstd −20, K = 2 equal means) on images, flat spectrum.

    (With order=1 the same call is finite: the NaN comes from the second-order products.)
    """
    noise = jax.random.normal(jax.random.PRNGKey(16), (2, 4, 4, 2))

    def fn(x_t, tau, labels):
        return GM(
            jnp.zeros(x_t.shape[:-1] + (2, 2)),
            jnp.full(x_t.shape[:-1] + (2,), -math.log(2.0)),
            jnp.full((x_t.shape[0], 1, 1, 1, 1), -20.0),
        )

    x = solvers.sample(
        fn,
        noise,
        key=jax.random.PRNGKey(17),
        solver="gm-sde",
        order=2,
        num_steps=3,
        spectrum_fn=lambda g: jnp.zeros(noise.shape),
    )
    assert np.all(np.isfinite(_np(x)))


# --- one compilation for new noise, keys and guidance; vmapped sweeps ------------------------------

N_GUIDED = 64


@pytest.fixture(scope="module")
def guided_setup(gm_data):
    noise = jax.random.normal(jax.random.PRNGKey(10), (N_GUIDED, 2))
    labels = jnp.arange(N_GUIDED) % gm_data.num_classes
    return gm_data.denoise_fn(), noise, labels, gm_data.null_label


@pytest.mark.parametrize(
    "config",
    [dict(solver="gm-sde", order=2, num_steps=3), dict(solver="gm-ode", order=2, num_steps=3, num_substeps=4)],
    ids=["gm-sde", "gm-ode"],
)
def test_sample_traces_once(guided_setup, config):
    fn, noise, labels, null = guided_setup
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(noise, key, w):
        return solvers.sample(fn, noise, labels, key=key, guidance=w, null_label=null, **config)

    a = run(noise, jax.random.PRNGKey(0), 0.2)
    b = run(noise + 0.1, jax.random.PRNGKey(1), 0.6)
    c = run(noise, jax.random.PRNGKey(0), 0.6)  # a third call, still no retrace
    assert np.all(np.isfinite(_np(a))) and np.all(np.isfinite(_np(b)))
    assert not np.allclose(_np(a), _np(c), atol=1e-3)  # guidance takes effect


def test_vmapped_guidance_sweep_matches_single_runs(guided_setup):
    fn, noise, labels, null = guided_setup
    config = dict(solver="gm-ode", order=2, num_steps=3, num_substeps=2, null_label=null, key=jax.random.PRNGKey(3))
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def sweep(ws):
        return jax.vmap(lambda w: solvers.sample(fn, noise, labels, guidance=w, **config))(ws)

    ws = jnp.array([0.0, 0.15, 0.5, 0.85], jnp.float32)
    out = _np(sweep(ws))
    assert out.shape == (4, N_GUIDED, 2)
    sweep(ws[::-1])  # another sweep: no new compilation
    single = jax.jit(lambda w: solvers.sample(fn, noise, labels, guidance=w, **config))
    for i, w in enumerate(np.asarray(ws)):
        np.testing.assert_allclose(out[i], _np(single(w)), atol=1e-4, err_msg=f"guidance {w}")
    # a concrete 0 switches guidance off (one network call per step): same result as a traced 0
    unguided = _np(solvers.sample(fn, noise, labels, guidance=0.0, **config))
    np.testing.assert_allclose(out[0], unguided, atol=1e-4)


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors_naming_the_argument(gm_data):
    fn = gm_data.denoise_fn()
    noise = jnp.zeros((8, 2))
    labels = jnp.zeros((8,), jnp.int32)
    key = jax.random.PRNGKey(0)
    null = gm_data.null_label

    def wrong_c(x_t, tau, labels):
        gm = fn(x_t, tau, labels)
        return GM(jnp.concatenate([gm.means, gm.means[..., :1]], -1), gm.logweights, gm.logstds)

    def wrong_k(x_t, tau, labels):
        gm = fn(x_t, tau, labels)
        return GM(gm.means, gm.logweights[..., :-1], gm.logstds)

    def wrong_logstds(x_t, tau, labels):
        gm = fn(x_t, tau, labels)
        return GM(gm.means, gm.logweights, jnp.zeros(x_t.shape[:1] + (3, 1)))

    def wrong_type(x_t, tau, labels):
        return gm_data.denoise_fn()(x_t, tau, labels).means

    cases = [
        (dict(denoise_fn=wrong_c), "denoise_fn"),
        (dict(denoise_fn=wrong_k), "logweights"),
        (dict(denoise_fn=wrong_logstds), "logstds"),
        (dict(denoise_fn=wrong_type), "denoise_fn"),
        (dict(guidance=1.0, labels=labels, null_label=null), "guidance"),
        (dict(guidance=-0.1, labels=labels, null_label=null), "guidance"),
        (dict(guidance=1.5, labels=labels, null_label=null, solver="gm-sde"), "guidance"),
        (dict(guidance=np.full((3,), 0.5), labels=labels, null_label=null), "guidance"),
        (dict(guidance=-1.0, labels=labels, null_label=null, solver="euler"), "guidance"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=2.5), "num_steps"),
        (dict(num_substeps=0), "num_substeps"),
        (dict(solver="heun"), "solver"),
        (dict(order=3), "order"),
        (dict(guidance=0.5, labels=labels), "null_label"),
        (dict(guidance=0.5, null_label=null), "labels"),
        (dict(guidance=0.5, labels=jnp.zeros((5,), jnp.int32), null_label=null), "labels"),
        (dict(solver="euler", num_substeps=4), "num_substeps"),
        (dict(ddpm_variance="huge", solver="ddpm"), "ddpm_variance"),
        (dict(spectrum_fn=lambda g: jnp.zeros((8, 2)), solver="gm-ode"), "spectrum_fn"),
        (dict(noise=jnp.zeros((8,))), "noise"),
    ]
    for overrides, name in cases:
        kwargs = dict(denoise_fn=fn, noise=noise, key=key) | overrides
        with pytest.raises(ValueError, match=name):
            solvers.sample(**kwargs)


# --- no NaN / Inf for arbitrary denoisers (hypothesis) ----------------------------------------------

K_ANY = 64
N_ANY = 4
NAN_CONFIGS = {
    "gm-ode": dict(solver="gm-ode", order=2, num_steps=3, num_substeps=2),
    "gm-sde": dict(solver="gm-sde", order=2, num_steps=3),
    "gm-sde-spectral": dict(solver="gm-sde", order=2, num_steps=3),
    "euler": dict(solver="euler", num_steps=3),
    "ddpm": dict(solver="ddpm", num_steps=3),
    "dpmpp-2m": dict(solver="dpmpp-2m", num_steps=3),
    "unipc": dict(solver="unipc", num_steps=4),
}
_RUNNERS = {}


def _arbitrary_denoiser(p):
    """A network returning arbitrary GMs: K = 64, logstd anywhere in [−20, 5], means tied to x_t and labels."""

    def fn(x_t, tau, labels):
        n, c = x_t.shape[0], x_t.shape[-1]
        lab = labels.astype(jnp.float32).reshape((n,) + (1,) * (x_t.ndim - 1))
        lab_s = labels.astype(jnp.float32).reshape((n,) + (1,) * x_t.ndim)
        means = p["means"][..., :c] * (1.0 + 0.5 * lab[..., None]) + p["coef"] * x_t[..., None, :]
        logits = p["logits"] + 0.3 * lab
        logw = jax.nn.log_softmax(jnp.broadcast_to(logits, x_t.shape[:-1] + (K_ANY,)), axis=-1)
        logstds = p["logstd"] + 0.1 * lab_s
        return GM(jnp.broadcast_to(means, x_t.shape[:-1] + (K_ANY, c)), logw, logstds)

    return fn


def _runner(name):
    if name not in _RUNNERS:
        config = NAN_CONFIGS[name]
        spectral = name == "gm-sde-spectral"
        labels = jnp.arange(N_ANY) % 3
        null = 3

        @jax.jit
        def run(p, noise, key, w, shift):
            spectrum_fn = None
            if spectral:
                _, h, wd, c = noise.shape

                def spectrum_fn(g):
                    logits = p["spec"][None] + 0.1 * jnp.mean(g.var, axis=(1, 2, 3))[:, None]
                    return G.log_spectrum_from_logits(logits, (h, wd, c), (4, 4))

            return solvers.sample(
                _arbitrary_denoiser(p),
                noise,
                labels,
                key=key,
                guidance=w,
                null_label=null,
                shift=shift,
                spectrum_fn=spectrum_fn,
                **config,
            )

        _RUNNERS[name] = run
    return _RUNNERS[name]


@pytest.mark.parametrize("name", list(NAN_CONFIGS))
@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    mean_scale=st.floats(0.0, 100.0),
    coef=st.floats(-1.0, 1.0),
    logstd=st.floats(-20.0, 4.7),  # plus 0.1 · label (≤ 3): logstds in [−20, 5]
    logit_scale=st.floats(0.0, 30.0),
    log10_shift=st.floats(-6.0, 1.0),
    guidance_fraction=st.floats(0.0, 0.99),
)
# former failures (time grid above 1 in float32; absolute product clamp on tiny variances), replayed first
@example(seed=0, mean_scale=0.0, coef=0.0, logstd=-20.0, logit_scale=0.0, log10_shift=-3.0, guidance_fraction=0.0)
@example(
    seed=0, mean_scale=1.0, coef=0.0, logstd=0.0, logit_scale=1.0, log10_shift=math.log10(0.2), guidance_fraction=0.5
)
def test_sample_output_finite_for_arbitrary_denoisers(
    name, seed, mean_scale, coef, logstd, logit_scale, log10_shift, guidance_fraction
):
    """σ reaches ~1e-6 through the shift (σ_{M−1} ≈ shift/(M−1)); guidance: w̃ < 1, or a CFG scale up to 8."""
    rng = np.random.default_rng(seed)
    params = {
        "means": jnp.asarray(mean_scale * rng.standard_normal((K_ANY, 3)), jnp.float32),
        "coef": jnp.float32(coef),
        "logits": jnp.asarray(logit_scale * rng.standard_normal(K_ANY), jnp.float32),
        "logstd": jnp.float32(logstd),
        "spec": jnp.asarray(5.0 * rng.standard_normal(3 * 16), jnp.float32),
    }
    shape = (N_ANY, 4, 4, 3) if name == "gm-sde-spectral" else (N_ANY, 2)
    noise = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = guidance_fraction if name.startswith("gm-") else 8.0 * guidance_fraction
    out = _runner(name)(params, noise, jax.random.PRNGKey(seed % 1000), w, 10.0**log10_shift)
    assert out.shape == shape
    assert np.all(np.isfinite(_np(out))), (name, np.asarray(out))


# --- CFG of the baselines, by hand ---------------------------------------------------------------------------


def _affine_velocity(x_t, tau, labels):
    """u = x_t + [1, 0] for class 0 and u = x_t + [0, 1] for the null class 1 (K = 1, unit std)."""
    offset = jnp.where((labels == 0)[:, None], jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))
    means = (x_t + offset)[:, None, :]
    return GM(means, jnp.zeros(means.shape[:-1]), jnp.zeros((x_t.shape[0], 1, 1)))


@pytest.mark.parametrize(
    "orthogonal,expected",
    [
        # σ: 1 → 0.5 → 0, w = 3, x = [1, 0]; Euler: x ← x + (σ' − σ) u, u = u_c + (w − 1) b, b = u_c − u_u.
        # Plain CFG: u_c = [2, 0], b = [1, −1], u = [4, −2], x = [−1, 1]; u_c = [0, 1], u = [2, −1], x = [−2, 1.5].
        (None, [-2.0, 1.5]),
        (0.0, [-2.0, 1.5]),
        # Projected off u_c: step 1 b·u_c/|u_c|² = 1/2, b = [0, −1], u = [2, −2], x = [0, 1];
        # step 2 u_c = [1, 1] ⟂ b = [1, −1], u = [3, −1], x = [−1.5, 1.5].
        (1.0, [-1.5, 1.5]),
    ],
)
def test_euler_cfg_matches_a_hand_computed_two_step_example(orthogonal, expected):
    x = solvers.sample(
        _affine_velocity,
        jnp.array([[1.0, 0.0]]),
        jnp.array([0]),
        key=jax.random.PRNGKey(0),
        solver="euler",
        num_steps=2,
        guidance=3.0,
        orthogonal=orthogonal,
        null_label=1,
    )
    np.testing.assert_allclose(np.asarray(x)[0], expected, atol=1e-6)


def test_cfg_sweep_value_zero_is_no_guidance():
    """In a traced sweep w = 0 must equal the unguided call (like w = 1), not the unconditional model."""
    noise, labels = jnp.array([[1.0, 0.0], [1.0, 0.0]]), jnp.array([0, 0])
    kw = dict(key=jax.random.PRNGKey(0), solver="euler", num_steps=2, null_label=1)
    swept = solvers.sample(_affine_velocity, noise, labels, guidance=jnp.array([0.0, 1.0]), **kw)
    plain = solvers.sample(_affine_velocity, noise[:1], labels[:1], guidance=0.0, **kw)
    np.testing.assert_allclose(swept, jnp.concatenate([plain, plain]), atol=1e-6)


_PAIRS_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gmflow_jax import piflow, solvers
from gmflow_jax.gm import GM

assert jax.device_count() == 8, jax.devices()
batch = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
n, k, c = 32, 3, 4
w_lab = jax.random.normal(jax.random.PRNGKey(0), (11, k, c))

def denoise(x, tau, labels):  # per example: rows never mix
    means = jnp.tanh(x[:, None, :] * (1.0 + tau[:, None, None] / 1000.0) + w_lab[labels])
    return GM(means, jnp.sin(means.sum(-1)), jnp.full((x.shape[0], 1, 1), -0.5))

x = jax.random.normal(jax.random.PRNGKey(1), (n, c))
labels = jnp.arange(n) % 10
tau = jnp.linspace(100.0, 900.0, n)
teacher = piflow.gmflow_teacher(denoise, guidance=0.4, null_label=10, guidance_interval=(0.0, 600.0))
calls = {
    "sampler": lambda x, tau, labels: solvers._Denoiser(denoise, labels, True, 10)(x, 0.5),
    "pi-Flow teacher": teacher,
}
for name, fn in calls.items():
    args = [jax.device_put(a, batch) for a in (x, tau, labels)]
    compiled = jax.jit(fn).lower(*args).compile()
    hlo = compiled.as_text()
    moved = [op for op in ("all-to-all", "collective-permute", "all-gather", "all-reduce") if op in hlo]
    assert not moved, (name, moved)
    got, want = compiled(*args), fn(x, tau, labels)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_guidance_pairs_keep_each_example_on_its_device():
    """The conditional and unconditional halves of a guided evaluation (the sampler's, the pi-Flow teacher's) are
    laid out example by example: on 8 devices with the batch sharded, the compiled call moves no data between
    devices (concatenating the halves moved half of every shard), and gives the unsharded call's values."""
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _PAIRS_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout[-2000:] + result.stderr[-3000:]
    )


def test_split_pairs_inverts_guidance_pairs():
    a, b = np.arange(12.0).reshape(3, 2, 2), -np.arange(12.0).reshape(3, 2, 2)
    pairs = solvers.guidance_pairs(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_array_equal(np.asarray(pairs)[1::2], b)
    np.testing.assert_array_equal(np.asarray(pairs)[0::2], a)
    back = solvers.split_pairs({"x": pairs})
    np.testing.assert_array_equal(back[0]["x"], a)
    np.testing.assert_array_equal(back[1]["x"], b)
