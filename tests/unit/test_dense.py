"""models.dense.dot_general: autodiff's product and gradients, with the CPU's kernel gradient on YNNPACK."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmflow_jax.models import dense


def _dims(x):
    return (((x.ndim - 1,), (0,)), ((), ()))


@pytest.mark.parametrize("shape", [(32, 24), (4, 8, 24)])
def test_product_and_gradients_match_float64(shape):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(shape), rng.standard_normal((24, 40))
    ct = rng.standard_normal(shape[:-1] + (40,))  # the cotangent of the product

    def loss(x, w):
        return jnp.sum(dense.dot_general(x, w, _dims(x)) * ct.astype(np.float32))

    value, (gx, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x.astype(np.float32), w.astype(np.float32))
    x2, ct2 = x.reshape(-1, 24), ct.reshape(-1, 40)  # float64: y = x w, dx = ct w^T, dw = x^T ct
    np.testing.assert_allclose(value, np.sum(x2 @ w * ct2), rtol=1e-5)
    np.testing.assert_allclose(gx, (ct2 @ w.T).reshape(shape), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gw, x2.T @ ct2, rtol=1e-5, atol=1e-4)


def test_other_products_are_lax_dot_general():
    rng = np.random.default_rng(1)
    a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 5, 6), (3, 6, 4)))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(dense.dot_general(a, b, batched), jax.lax.dot_general(a, b, batched))


def _kernel_gradient(dot_general, platforms=("cpu",)):
    """The lowered gradient of ``sum(tanh(x @ w))`` with respect to w, for ``platforms``."""
    x, w = jnp.ones((64, 48)), jnp.ones((48, 96))
    grad = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(dot_general(x, w, _dims(x)))), argnums=0))
    return grad.trace(w, x).lower(lowering_platforms=platforms)


def test_cpu_kernel_gradient_is_a_product_ynnpack_takes():
    """Autodiff's x^T g reaches XLA:CPU with x's contracting dimension first, which YNNPACK refuses."""
    plain = _kernel_gradient(jax.lax.dot_general).compile().as_text()
    ours = _kernel_gradient(dense.dot_general).compile().as_text()
    assert "lhs_contracting_dims={0}" in plain
    assert "lhs_contracting_dims={0}" not in ours and "ynn_fusion" in ours


def test_tpu_and_gpu_programs_are_autodiffs():
    for platform in ("tpu", "cuda"):
        plain = _kernel_gradient(jax.lax.dot_general, (platform,)).as_text()
        ours = _kernel_gradient(dense.dot_general, (platform,)).as_text()
        assert "optimization_barrier" not in ours
        assert ours.count("dot_general") == plain.count("dot_general") == 2
    assert "optimization_barrier" in _kernel_gradient(dense.dot_general).as_text()
