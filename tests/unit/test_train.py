"""The trainer in-process: the pure train step (``gmflow_jax.train.step``) and ``train()`` as a library call."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tree_helpers import assert_trees_close, digits_batch

from gmflow_jax import checkpoint
from gmflow_jax.models.factory import data_shape
from gmflow_jax.sharding import make_mesh
from gmflow_jax.train.config import load_config
from gmflow_jax.train.state import frozen_mask, init_state, setup_state
from gmflow_jax.train.step import drop_labels, make_train_step, micro_batches


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


def test_micro_batches_keep_each_device_block_local():
    x = jnp.arange(12)  # 3 device blocks of 4 rows, split into 2 micro-batches of 2 rows per block
    np.testing.assert_array_equal(micro_batches({"x": x}, 2, 3)["x"], [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]])
    np.testing.assert_array_equal(micro_batches({"x": x}, 4, 1)["x"], x.reshape(4, 3))


def test_grad_accumulation_equals_one_step_at_the_whole_batch():
    """k = 1, 2, 4 micro-batches: the same loss, metrics and new state (one step, then ten steps)."""
    config = load_config("digits_gmdit:tiny")  # batch 16
    config.optim.warmup_steps = 0  # full learning rate from step 0, so that ten steps move the weights
    setup = setup_state(config, make_mesh((-1, 1)))
    steps = {}
    for k in (1, 2, 4):
        c = config.copy_and_resolve_references()
        c.grad_accum_steps = k
        steps[k] = jax.jit(make_train_step(setup.graphdef, setup.tx, setup.schedule, c))
    state = init_state(setup, seed=0)
    batches = [digits_batch(config, seed) for seed in range(10)]
    one = {k: step(state, batches[0]) for k, step in steps.items()}
    assert float(one[1][1]["grad_norm"]) > 0
    for k in (2, 4):
        assert_trees_close(one[1], one[k])
    final = {}
    for k in (1, 4):
        s = state
        for batch in batches:
            s, metrics = steps[k](s, batch)
        final[k] = (s, metrics)
    moved = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(final[1][0].params), strict=True)
    )
    assert moved > 10 * config.optim.lr  # ten AdamW steps at lr 2e-4 moved the weights
    # every leaf, the attention key bias included. AdamW moves an element by about lr a step whatever its
    # gradient's size, so where a gradient is at float32 round-off the summation order (micro-batches, XLA's
    # reductions) decides that element's steps: allow 0.1 % of the ten steps' reach, 10 · lr · 1e-3
    assert_trees_close(final[1], final[4], rtol=1e-3, atol=10 * config.optim.lr * 1e-3)
    for k in (1, 4):  # its exact gradient is 0: left out of the update, it keeps its initial value
        key_bias = final[k][0].params["net"]["blocks"][0]["attn"]["key"]["bias"]
        np.testing.assert_array_equal(key_bias, state.params["net"]["blocks"][0]["attn"]["key"]["bias"])


def test_the_optimizer_leaves_only_the_attention_key_bias_out():
    config = load_config("digits_gmdit:tiny")
    config.optim.warmup_steps = 0  # full learning rate at step 0: every other update is non-zero
    setup = setup_state(config, make_mesh((-1, 1)))
    frozen = [
        jax.tree_util.keystr(p) for p, f in jax.tree_util.tree_leaves_with_path(frozen_mask(setup.abstract.params)) if f
    ]
    assert frozen == ["['net']['blocks'][0]['attn']['key']['bias']"]
    params = jax.tree.map(jnp.ones_like, init_state(setup, seed=0).params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = setup.tx.update(grads, setup.tx.init(params), params)
    flat = {jax.tree_util.keystr(p): np.asarray(u) for p, u in jax.tree_util.tree_leaves_with_path(updates)}
    assert np.all(flat[frozen[0]] == 0) and all(np.all(u != 0) for name, u in flat.items() if name != frozen[0])


def test_one_device_and_eight_devices_make_the_same_steps():
    """The step does not depend on how the batch is laid over devices or split into micro-batches:
    1 device (k = 1) against 8 simulated devices, data-parallel (k = 2) and 2 × 4 FSDP (k = 2)."""
    code = textwrap.dedent(
        """
        import sys
        import jax, numpy as np
        from gmflow_jax.sharding import make_mesh
        from gmflow_jax.train.config import load_config
        from gmflow_jax.train.state import init_state, setup_state
        from gmflow_jax.train.step import jit_train_step
        sys.path.insert(0, HERE)
        from tree_helpers import assert_trees_close, digits_batch

        results = []
        for mesh_shape, devices, k, fsdp in (((1, 1), 1, 1, False), ((8, 1), 8, 2, False), ((2, 4), 8, 2, True)):
            c = load_config("digits_gmdit:tiny")
            c.optim.warmup_steps, c.grad_accum_steps = 0, k
            if fsdp:
                c.sharding.embed = "fsdp"
            mesh = make_mesh(mesh_shape, devices=jax.devices()[:devices])
            setup = setup_state(c, mesh)
            step, state = jit_train_step(c, setup, mesh), init_state(setup, seed=0)
            for seed in range(3):
                state, metrics = step(state, digits_batch(c, seed))
            results.append(jax.device_get((state, metrics)))
        assert_trees_close(results[0], results[1], rtol=1e-3)
        assert_trees_close(results[0], results[2], rtol=1e-3)
        print("OK")
        """
    ).replace("HERE", repr(os.path.dirname(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


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
