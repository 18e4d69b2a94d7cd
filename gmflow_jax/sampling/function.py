"""The one compiled sampling function: ``sample_fn`` (noise per sample from ``fold_in(key, index)``, then a GM
solver of ``gmflow_jax.solvers``, vmapped over a guidance sweep, or a pi-Flow student's policy sampler)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gmflow_jax import piflow, solvers

PIFLOW = "piflow"  # a pi-Flow student's own N-step policy sampler (piflow.piflow_sample)
SOLVERS = (*solvers.SOLVERS, PIFLOW)


def sample_fn(graphdef: nnx.GraphDef, data_shape: tuple[int, ...], null_label: int | None, static: tuple) -> Callable:
    """The (unjitted) sampler of one static configuration
    ``(solver, order, num_steps, num_substeps, guided, sweep, use_spectrum)``:
    ``(params, k_noise, k_solver, index (N,), labels (N,) | None, guidance () | (G,), orthogonal, shift,
    noise=None, temperature=1.0, final_step_size_scale=1.0) -> x0``.

    Sample ``i`` starts from ``noise[i]`` when ``noise`` (N, *data_shape) is given, else from
    ``normal(fold_in(k_noise, index[i]))``. For ``solver='piflow'`` (a pi-Flow student) ``num_substeps``
    is the policy's ``total_substeps``, ``order``, ``guided``, ``sweep`` and ``use_spectrum`` are unused
    and ``guidance``, ``orthogonal`` and ``k_solver`` ignored (the sampler is deterministic);
    ``temperature`` and ``final_step_size_scale`` are used by it only.
    """
    solver, order, num_steps, num_substeps, guided, sweep, use_spectrum = static

    def start(k_noise, index, noise):
        if noise is not None:
            return noise
        draw = lambda i: jax.random.normal(jax.random.fold_in(k_noise, i), data_shape, jnp.float32)  # noqa: E731
        return jax.vmap(draw)(index)

    if solver == PIFLOW:

        def run_student(params, k_noise, k_solver, index, labels, guidance, orthogonal, shift, noise=None, *policy):
            temperature, final_step_size_scale = policy if policy else (1.0, 1.0)
            return piflow.piflow_sample(
                nnx.merge(graphdef, params).net,
                start(k_noise, index, noise),
                labels,
                num_steps=num_steps,
                total_substeps=num_substeps,
                temperature=temperature,
                shift=shift,
                final_step_size_scale=final_step_size_scale,
            )

        return run_student

    def run(params, k_noise, k_solver, index, labels, guidance, orthogonal, shift, noise=None, *_policy):
        model = nnx.merge(graphdef, params)
        noise = start(k_noise, index, noise)
        spectrum_fn = model.spectrum if use_spectrum else None

        def one(w: jax.Array) -> jax.Array:
            return solvers.sample(
                model.net,
                noise,
                labels,
                key=k_solver,
                solver=solver,
                order=order,
                num_steps=num_steps,
                num_substeps=num_substeps,
                guidance=w if guided else 0.0,
                orthogonal=orthogonal,
                null_label=null_label,
                shift=shift,
                spectrum_fn=spectrum_fn,
            )

        return jax.vmap(one)(guidance) if sweep else one(guidance)

    return run
