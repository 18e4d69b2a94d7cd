"""The trainer in-process: the pure train step (``gmflow_jax.train.step``) and ``train()`` as a library call."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmflow_jax import checkpoint
from gmflow_jax.models.factory import data_shape
from gmflow_jax.sharding import make_mesh
from gmflow_jax.train.config import load_config
from gmflow_jax.train.state import init_state, setup_state
from gmflow_jax.train.step import drop_labels, make_train_step


def test_drop_labels_replaces_with_the_null_class_at_rate_p():
    labels = jnp.arange(20_000, dtype=jnp.int32) % 10
    dropped = np.asarray(drop_labels(jax.random.PRNGKey(0), labels, 10, 0.1))
    null = dropped == 10
    assert abs(null.mean() - 0.1) < 4 * np.sqrt(0.1 * 0.9 / labels.size)  # 4-sigma binomial band
    np.testing.assert_array_equal(dropped[~null], np.asarray(labels)[~null])
    np.testing.assert_array_equal(drop_labels(jax.random.PRNGKey(0), labels, 10, 0.0), labels)


def test_train_step_is_pure_and_updates_the_ema_by_its_formula():
    config = load_config("digits_gmdit:tiny")
    mesh = make_mesh((-1, 1))
    setup = setup_state(config, mesh)
    step = jax.jit(make_train_step(setup.graphdef, setup.tx, setup.schedule, config))
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.uniform(-1, 1, (config.batch_size, *data_shape(config.model))), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, config.batch_size), jnp.int32),
    }
    state = init_state(setup, seed=0)
    s1, m1 = step(state, batch)
    s2, m2 = step(state, batch)
    assert int(s1.step) == 1 and np.isfinite(float(m1["loss"]))
    for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2)), strict=True):
        np.testing.assert_array_equal(a, b)  # same inputs -> same outputs: randomness only from (rng, step)
    # EMA: beta = 0.5 ** (B / min(max_nimg, ratio · B · (step + 1))) at step 0
    beta = 0.5 ** (config.batch_size / min(config.ema.max_nimg, config.ema.ratio * config.batch_size))
    assert float(m1["ema_beta"]) == pytest.approx(beta, rel=1e-6)
    for e0, p1, e1 in zip(jax.tree.leaves(state.ema), jax.tree.leaves(s1.params), jax.tree.leaves(s1.ema), strict=True):
        np.testing.assert_allclose(e1, beta * np.asarray(e0) + (1 - beta) * np.asarray(p1), rtol=1e-5, atol=1e-7)


def test_train_function_in_process(tmp_path):
    """``train(config, workdir)`` is a library call (Colab): returns the final state, writes the run."""
    from gmflow_jax.train import train

    c = load_config("checkerboard_k64:tiny")
    c.data.data_dir = str(tmp_path / "tfds")
    c.model.hidden, c.model.num_layers, c.model.num_freqs = 16, 1, 2
    c.batch_size, c.num_steps = 32, 4
    c.log.sample_every_steps, c.log.sample_points = 4, 256
    workdir = tmp_path / "run"
    state = train(c, str(workdir))
    assert int(state.step) == 4
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    assert checkpoint.list_steps(directory) == [4]
    assert (workdir / "samples" / "step_00000004.png").exists()
    saved = checkpoint.restore(directory, 4)
    np.testing.assert_array_equal(saved["params"]["net"]["head"]["bias"], state.params["net"]["head"]["bias"])
