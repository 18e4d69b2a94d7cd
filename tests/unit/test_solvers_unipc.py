"""``solver='unipc'`` (method.md §7.6) against diffusers' ``UniPCMultistepScheduler`` driven as the authors'
``FlowAdapterScheduler`` drives it, on the exact denoiser of a GM data distribution (float64 NumPy)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmflow_jax import solvers

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

REL_TOL = 1e-4
N_POINTS = 64


def flow_adapter_sample(u_fn, x1: np.ndarray, num_steps: int, shift: float, **scheduler_kwargs) -> np.ndarray:
    """The authors' FlowAdapterScheduler(base_scheduler='UniPCMultistep') loop, in float64 samples.

    Their adapter: flow σ_i = s u / (1 + (s − 1) u) on u = 1 − i/N (float32), σ_N = 0; the base scheduler gets
    timesteps 1000 σ_i, sigmas σ/max(α, 1e-6), ``prediction_type='epsilon'``, ``final_sigmas_type='zero'``,
    ``lower_order_final=True``, the noise prediction ε = x + α u and the sample x/√(α² + σ²), and its output
    is scaled back by √(α² + σ²) of the next level. ``u_fn(x, sigma)`` is the (guided) velocity.
    """
    u = 1.0 - np.linspace(0, 1, num_steps, dtype=np.float32, endpoint=False)
    sig = torch.from_numpy(shift * u / (1 + (shift - 1) * u))
    timesteps = sig * 1000
    sig = torch.cat([sig, torch.zeros(1)])
    alpha = 1 - sig
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="epsilon",
        final_sigmas_type="zero",
        lower_order_final=True,
        **scheduler_kwargs,
    )
    scheduler.set_timesteps(num_steps)
    scheduler.timesteps = timesteps
    scheduler.sigmas = sig / alpha.clamp(min=1e-6)
    scales = (alpha**2 + sig**2).sqrt()
    x = torch.as_tensor(x1, dtype=torch.float64)
    for i, t in enumerate(timesteps):
        eps = x + alpha[i] * torch.from_numpy(u_fn(x.numpy(), float(sig[i])))
        x = scheduler.step(eps, t, x / scales[i], return_dict=False)[0] * scales[i + 1]
    return x.numpy()


def cfg_velocity(gm_data, labels, w):
    """The authors' CFG on the velocity, u = u_c + (w − 1)(u_c − u_u), of the exact float64 posterior mean."""

    def u_fn(x, sigma):
        def u(lab):
            return (x - gm_data.posterior_mean_x0(x, sigma, lab)) / sigma

        if w <= 1.0:
            return u(labels)
        u_c = u(labels)
        return u_c + (w - 1.0) * (u_c - u(np.full_like(labels, gm_data.null_label)))

    return u_fn


@pytest.fixture(scope="module")
def problem(gm_data):
    x1 = np.random.default_rng(21).standard_normal((N_POINTS, 2)).astype(np.float32)
    labels = np.arange(N_POINTS) % gm_data.num_classes
    return x1, labels


@functools.partial(jax.jit, static_argnames=("fn", "null_label", "num_steps"))
def _jitted(x1, labels, shift, w, *, fn, null_label, num_steps):
    return solvers.sample(
        fn,
        x1,
        labels,
        key=jax.random.PRNGKey(0),
        solver="unipc",
        num_steps=num_steps,
        shift=shift,
        guidance=w,
        orthogonal=0.0,
        null_label=null_label,
    )


_FNS = {}


def _ours(gm_data, x1, labels, num_steps, shift, w):
    """Our sampler, jitted once per ``num_steps``: shift and guidance are traced (a traced w = 0 is no guidance,
    as a concrete one, test_solvers.py ``test_cfg_sweep_value_zero_is_no_guidance``)."""
    fn = _FNS.setdefault(id(gm_data), gm_data.denoise_fn())
    out = _jitted(
        jnp.asarray(x1),
        jnp.asarray(labels),
        jnp.float32(shift),
        jnp.float32(w),
        fn=fn,
        null_label=gm_data.null_label,
        num_steps=num_steps,
    )
    return np.asarray(out, np.float64)


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("w", [0.0, 3.0], ids=["no-cfg", "cfg3"])
@pytest.mark.parametrize("shift", [1.0, 3.0], ids=["shift1", "shift3"])
@pytest.mark.parametrize("num_steps", [4, 8, 16])
def test_unipc_matches_the_authors_flow_adapter(gm_data, problem, num_steps, shift, w):
    x1, labels = problem
    ref = flow_adapter_sample(cfg_velocity(gm_data, labels, w), x1, num_steps, shift)
    ours = _ours(gm_data, x1, labels, num_steps, shift, w)
    assert _rel(ours, ref) < REL_TOL, _rel(ours, ref)


@pytest.mark.parametrize("num_steps", [4, 8, 16])
def test_order_one_is_told_apart(gm_data, problem, num_steps):
    """The control: UniPC of order 1 (and the Euler baseline) miss the order-2 reference by far more than the
    tolerance, so the comparison above does tell the orders apart."""
    x1, labels = problem
    u_fn = cfg_velocity(gm_data, labels, 3.0)
    ref = flow_adapter_sample(u_fn, x1, num_steps, 3.0)
    order1 = flow_adapter_sample(u_fn, x1, num_steps, 3.0, solver_order=1)
    assert _rel(order1, ref) > 100 * REL_TOL, _rel(order1, ref)
    ours = _ours(gm_data, x1, labels, num_steps, 3.0, 3.0)
    assert _rel(ours, order1) > 100 * REL_TOL, _rel(ours, order1)
    if num_steps == 8:
        euler = np.asarray(
            solvers.sample(
                gm_data.denoise_fn(),
                jnp.asarray(x1),
                jnp.asarray(labels),
                key=jax.random.PRNGKey(0),
                solver="euler",
                num_steps=num_steps,
                shift=3.0,
                guidance=3.0,
                null_label=gm_data.null_label,
            ),
            np.float64,
        )
        assert _rel(euler, ref) > 100 * REL_TOL, _rel(euler, ref)


def test_unipc_jits_once_and_vmaps_over_guidance(gm_data, problem):
    x1, labels = problem
    fn, null = _FNS.setdefault(id(gm_data), gm_data.denoise_fn()), gm_data.null_label
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def sweep(noise, ws):
        return jax.vmap(lambda w: _jitted(noise, jnp.asarray(labels), 2.0, w, fn=fn, null_label=null, num_steps=4))(ws)

    ws = jnp.array([1.5, 4.0], jnp.float32)
    out = np.asarray(sweep(jnp.asarray(x1), ws))
    sweep(jnp.asarray(x1) + 0.1, ws[::-1])  # new noise and guidance: no retrace
    for i, w in enumerate(np.asarray(ws)):
        np.testing.assert_allclose(out[i], _ours(gm_data, x1, labels, 4, 2.0, w), atol=1e-5, err_msg=f"w = {w}")
