"""The matrix product of a Dense layer, with a weight gradient that XLA:CPU runs on its fast matmul.

``dot_general`` is a drop-in for ``jax.lax.dot_general`` in ``nnx.Linear(dot_general=...)``. It computes the
same product; what changes is the kernel gradient of the backward pass, and only on the CPU:

autodiff writes the kernel gradient of ``y = x @ W`` (x (M, D), W (D, F)) as ``x^T @ g`` with x's
contracting dimension first, a product XLA:CPU's YNNPACK matmul does not take (it wants the left
operand with its contracting dimension last), so XLA runs it on its own, slower matmul, after copying
g into a transposed layout. Here the CPU branch materialises ``x^T`` (M·D values, behind an
``optimization_barrier`` so that XLA cannot fold the transpose back into the product) and multiplies
it by ``g`` as it is: a product YNNPACK takes. The sums are the same products in another order (equal
to float32 round-off). On every other platform (``jax.lax.platform_dependent``'s default branch) the
product is plain ``lax.dot_general`` and its gradients autodiff's: the recipes' TPU programs compile to the
same memory, FLOPs and code as without it (docs/performance.md §10).
"""

from __future__ import annotations

import functools

import jax
from jax import lax

Array = jax.Array


def dot_general(
    x: Array, kernel: Array, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None
) -> Array:
    """``lax.dot_general(x, kernel, ...)``; for a Dense product (x (..., D) · kernel (D, F), no batch
    dimensions) the CPU's backward pass computes the kernel gradient as described in the module docstring."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    plain = functools.partial(
        lax.dot_general,
        dimension_numbers=dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )
    is_dense = (
        kernel.ndim == 2
        and tuple(lhs_contract) == (x.ndim - 1,)
        and tuple(rhs_contract) == (0,)
        and not lhs_batch
        and not rhs_batch
        and out_sharding is None
    )
    if not is_dense:
        return plain(x, kernel)
    cpu = functools.partial(_dense_on_cpu, precision, preferred_element_type)
    return lax.platform_dependent(x, kernel, cpu=cpu, default=plain)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dense_on_cpu(precision, preferred_element_type, x: Array, kernel: Array) -> Array:
    """``x (..., D) @ kernel (D, F) -> (..., F)``."""
    return _product(precision, preferred_element_type, x, kernel)


def _product(precision, preferred_element_type, x: Array, kernel: Array) -> Array:
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return lax.dot_general(x, kernel, dims, precision=precision, preferred_element_type=preferred_element_type)


def _dense_fwd(precision, preferred_element_type, x, kernel):
    return _product(precision, preferred_element_type, x, kernel), (x, kernel)


def _dense_bwd(precision, preferred_element_type, residuals, g):
    x, kernel = residuals
    # the input gradient exactly as autodiff computes it
    _, x_vjp = jax.vjp(lambda x_: _product(precision, preferred_element_type, x_, kernel), x)
    (dx,) = x_vjp(g)
    # the kernel gradient from a materialised x^T (D, M) times g (M, F)
    x_t = lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
    g2 = g.reshape(-1, g.shape[-1]).astype(x.dtype)
    dkernel = lax.dot_general(x_t, g2, (((1,), (0,)), ((), ())), precision=precision)
    return dx, dkernel.astype(kernel.dtype)


_dense_on_cpu.defvjp(_dense_fwd, _dense_bwd)
