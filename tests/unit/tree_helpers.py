"""Helpers of the train-step tests: a random digits batch, and trees compared within float32 noise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gmflow_jax.models.factory import data_shape


def digits_batch(config, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.uniform(-1, 1, (config.batch_size, *data_shape(config.model))), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, config.batch_size), jnp.int32),
    }


def assert_trees_close(a, b, rtol: float = 2e-4, atol: float = 0.0) -> None:
    """Every leaf, within float32 summation noise: |a − b| ≤ rtol · (|a| + 1e-2 · max |a| of the leaf) + atol."""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        name = jax.tree_util.keystr(path)
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = 1e-2 * float(np.max(np.abs(x))) if x.size else 0.0
        np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * scale + atol + 1e-12, err_msg=name)
