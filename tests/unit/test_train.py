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


def _step_compiles(caplog) -> int:
    return sum("Finished XLA compilation of jit(step_fn)" in r.getMessage() for r in caplog.records)


def test_trainer_compiles_the_step_once_before_the_state(tmp_path, caplog):
    """The step is compiled from shapes before the state exists, and the loop's calls (fresh start and
    resume, whose state comes from a checkpoint) reuse that executable instead of compiling again."""
    import logging

    from gmflow_jax.train import train

    c = load_config("checkerboard_k64:tiny")
    c.data.data_dir = str(tmp_path / "tfds")
    c.model.hidden, c.model.num_layers, c.model.num_freqs = 16, 1, 2
    c.batch_size, c.num_steps = 32, 2
    c.log.sample_every_steps = 0
    caplog.set_level(logging.WARNING, logger="jax")
    caplog.set_level(logging.INFO, logger="absl")
    for num_steps in (2, 4):  # a fresh run, then its resume
        c.num_steps = num_steps
        caplog.clear()
        with jax.log_compiles(True):
            state = train(c, str(tmp_path / "run"))
        assert int(state.step) == num_steps
        messages = [r.getMessage() for r in caplog.records]
        assert _step_compiles(caplog) == 1, [m[:120] for m in messages]
    compiled = next(i for i, m in enumerate(messages) if m.startswith("compiled the train step"))
    assert compiled < next(i for i, m in enumerate(messages) if m.startswith("resumed from"))


def test_return_freed_memory_hands_heap_pages_back(tmp_path):
    """glibc keeps freed heap chunks resident; ``return_freed_memory`` gives them back."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    script = """
from gmflow_jax.train.memory import return_freed_memory
def rss_mb():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024
blocks = [bytearray(b'x' * 100_000) for _ in range(3000)]  # 300 MB written, in chunks below the mmap threshold
kept = blocks[::10]  # every tenth stays: the heap cannot shrink from its top
del blocks
before = rss_mb()
return_freed_memory()
print(before, rss_mb())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert before - after > 150, f"resident {before} MB before, {after} MB after return_freed_memory()"
