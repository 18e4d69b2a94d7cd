"""Periodic preview of the EMA model: GM-ODE samples of a fixed grid (a pi-Flow student: its own
``distill.nfe``-step policy sampler), rendered as one image.

``make_preview_fn`` returns a jitted ``(ema_params, key) -> samples`` (replicated, float32) built on
the Sampler's compiled function (``gmflow_jax.sampling.sample_fn``):
``(classes·per_class, H, W, C)`` images, class ``i`` in row ``i``, or ``(points, 2)`` for 2-D data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from gmflow_jax.models.factory import build_model, split_params
from gmflow_jax.sampling import NOISE_KEY, PIFLOW, SOLVER_KEY, sample_fn
from gmflow_jax.sharding import replicated


def make_preview_fn(config: Any, mesh: Mesh, data_shape: tuple[int, ...]) -> Callable[[Any, jax.Array], jax.Array]:
    """Jitted GM-ODE sampler of the preview grid (``config.log.sample_*``), no guidance. The model is built
    without remat or the block scan (no gradients here); its parameters are the training model's."""
    lc, mc = config.log, config.model
    if len(data_shape) == 3:
        classes = min(lc.sample_classes, mc.num_classes)
        labels = jnp.repeat(jnp.arange(classes, dtype=jnp.int32), lc.sample_per_class)
    else:
        labels = None
    n = lc.sample_points if labels is None else labels.shape[0]
    graphdef, _ = split_params(nnx.eval_shape(lambda: build_model(mc, nnx.Rngs(0), remat=False)))
    d = config.distill
    if d.nfe > 0:  # a pi-Flow student: its own N-step policy sampler
        static = (PIFLOW, 1, d.nfe, d.total_substeps, False, False, False)
        shift, policy = d.shift, (d.temperature, d.final_step_size_scale)
    else:
        static = ("gm-ode", lc.sample_order, lc.sample_steps, 1, False, False, False)
        shift, policy = 1.0, ()
    run = sample_fn(graphdef, data_shape, None, static)

    def sample(params: Any, key: jax.Array) -> jax.Array:
        k_noise, k_solver = jax.random.fold_in(key, NOISE_KEY), jax.random.fold_in(key, SOLVER_KEY)
        return run(params, k_noise, k_solver, jnp.arange(n), labels, 0.0, 0.0, shift, None, *policy)

    return jax.jit(sample, out_shardings=replicated(mesh))
