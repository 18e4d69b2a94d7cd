"""Periodic preview of the EMA model: GM-ODE samples rendered as one image (class × sample grid or 2-D histogram).

``make_sampler`` returns a jitted ``(ema_params, key) -> samples`` (replicated, float32):
``(classes·per_class, H, W, C)`` images, class ``i`` in row ``i``, or ``(points, 2)`` for 2-D data.
``render`` turns them into an ``(H, W, 3)`` uint8 picture; ``save_png`` writes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gmflow_jax import solvers
from gmflow_jax.sharding import replicated

HIST_RANGE = 4.5  # 2-D histogram covers [-4.5, 4.5]² (the checkerboard is [-4, 4]²)
HIST_BINS = 128


def make_sampler(
    graphdef: nnx.GraphDef, config: Any, mesh: Mesh, data_shape: tuple[int, ...]
) -> Callable[[Any, jax.Array], jax.Array]:
    """Jitted GM-ODE sampler of the preview grid (``config.log.sample_*``)."""
    lc, mc = config.log, config.model
    images = len(data_shape) == 3
    if images:
        classes = min(lc.sample_classes, mc.num_classes)
        labels = jnp.repeat(jnp.arange(classes, dtype=jnp.int32), lc.sample_per_class)
    else:
        labels = jnp.zeros((lc.sample_points,), jnp.int32)
    n = labels.shape[0]

    def sample(params: Any, key: jax.Array) -> jax.Array:
        net = nnx.merge(graphdef, params).net
        k_noise, k_solver = jax.random.split(key)
        noise = jax.random.normal(k_noise, (n, *data_shape), jnp.float32)
        return solvers.sample(
            net,
            noise,
            labels if images else None,
            key=k_solver,
            solver="gm-ode",
            order=lc.sample_order,
            num_steps=lc.sample_steps,
        )

    return jax.jit(sample, out_shardings=replicated(mesh))


def render(samples: np.ndarray, rows: int) -> np.ndarray:
    """Samples -> (H, W, 3) uint8: an image grid with ``rows`` rows, or a log-density histogram of 2-D points."""
    samples = np.asarray(samples, np.float32)
    if samples.ndim == 2:
        hist, _, _ = np.histogram2d(
            samples[:, 1], samples[:, 0], bins=HIST_BINS, range=[[-HIST_RANGE, HIST_RANGE], [-HIST_RANGE, HIST_RANGE]]
        )
        img = np.log1p(hist[::-1])  # y up
        img = img / max(img.max(), 1e-8)
        img = np.kron(img, np.ones((2, 2)))
        return np.repeat((255 * img).astype(np.uint8)[..., None], 3, axis=-1)
    n, h, w, c = samples.shape
    if c >= 3:
        pix = samples[..., :3]
    else:
        pix = np.repeat(samples[..., :1], 3, axis=-1)
    pix = np.clip((pix + 1.0) / 2.0, 0.0, 1.0)  # data in [-1, 1]
    cols = n // rows
    pad = 1
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.float32)
    for i in range(rows * cols):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = pix[i]
    scale = max(1, 512 // grid.shape[0])
    grid = np.kron(grid, np.ones((scale, scale, 1)))
    return (255 * grid).astype(np.uint8)


def save_png(image: np.ndarray, path: str) -> None:
    """Writes an (H, W, 3) uint8 image as PNG (atomically)."""
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(image).save(tmp)
    os.replace(tmp, path)
