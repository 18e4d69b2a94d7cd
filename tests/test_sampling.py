"""``gmflow_jax.sampling``: a tiny digits GM-DiT trained 4 steps by the trainer, then sampled from its checkpoints."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gmflow_jax import checkpoint as ckpt_lib
from gmflow_jax.sampling import Sampler, SamplingCheckpointError, available_steps, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A one-block GM-DiT (K = 2, SpectrumMLP) trained 4 steps on the digits; checkpoints at steps 2 and 4."""
    from gmflow_jax import train
    from gmflow_jax.demo import load_config

    c = load_config(str(ROOT / "configs" / "digits_gmdit.py"))
    c.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    c.num_steps, c.batch_size = 4, 16
    c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 1, 2
    c.model.num_gaussians, c.model.logstd_inner_dim = 2, 16
    c.checkpoint.every_steps, c.checkpoint.async_save = 2, False
    c.log.sample_every_steps = 0
    wd = tmp_path_factory.mktemp("run")
    train.train(c, str(wd))
    return wd


@pytest.fixture(scope="module")
def sampler(workdir) -> Sampler:
    return Sampler.from_checkpoint(str(workdir))


def test_from_checkpoint_shapes_and_paths(workdir, sampler):
    assert sampler.step == 4 and sampler.data_shape == (8, 8, 1)
    assert sampler.num_classes == 10 and sampler.null_label == 10 and sampler.has_spectrum
    assert available_steps(str(workdir)) == [2, 4]
    labels = sampler.class_grid(2)
    np.testing.assert_array_equal(labels[:4], [0, 0, 1, 1])
    for solver in ("gm-ode", "gm-sde"):  # gm-sde goes through the SpectrumMLP
        x = sampler.sample(0, labels, solver=solver)
        assert x.shape == (20, 8, 8, 1) and x.dtype == np.float32 and np.all(np.isfinite(x)), solver
    one_class = sampler.sample(jax.random.PRNGKey(1), labels=3, num_samples=5)
    assert one_class.shape == (5, 8, 8, 1)
    # the checkpoint root, a step directory and an explicit step resolve too; raw parameters differ from the EMA
    assert Sampler.from_checkpoint(str(workdir / "checkpoints")).step == 4
    at2 = Sampler.from_checkpoint(str(workdir / "checkpoints" / "2"))
    assert at2.step == 2 and Sampler.from_checkpoint(str(workdir), step=2, use_ema=False).step == 2
    raw = Sampler.from_checkpoint(str(workdir), use_ema=False)
    assert not np.allclose(raw.sample(0, labels), sampler.sample(0, labels))


def test_guidance_sweep_is_one_vmapped_call_and_compiles_once(sampler):
    labels = sampler.class_grid(1)
    kw = dict(solver="gm-ode", num_steps=4)
    before = sampler.num_traces
    sweep = sampler.sample(0, labels, guidance=[0.1, 0.5], **kw)
    assert sweep.shape == (2, 10, 8, 8, 1)
    a = sampler.sample(0, labels, guidance=0.1, **kw)
    b = sampler.sample(0, labels, guidance=np.float32(0.5), **kw)
    scale = float(np.abs(sweep).max())
    np.testing.assert_allclose(sweep[0], a, atol=1e-4 * scale)
    np.testing.assert_allclose(sweep[1], b, atol=1e-4 * scale)
    assert not np.allclose(a, b)  # guidance matters
    sampler.sample(0, labels, guidance=[0.2, 0.3], **kw)  # new sweep values: no retrace
    # one trace for the sweep, one for single guided calls (two values)
    assert sampler.num_traces - before == 2, sampler.traces
    assert all(v == 1 for k, v in sampler.traces.items() if k[2] == 4), sampler.traces


def test_chunks_do_not_change_gm_ode_samples(sampler):
    labels = sampler.class_grid(1)
    whole = sampler.sample(7, labels, num_steps=2)
    chunked = sampler.sample(7, labels, num_steps=2, batch_size=3, progress=True)
    np.testing.assert_allclose(chunked, whole, atol=1e-5 * float(np.abs(whole).max()))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels=[0, 10]), "labels must lie in"),
        (dict(labels=[-1, 2]), "labels must lie in"),
        (dict(labels=[0.5, 1.0]), "labels must be integers"),
        (dict(labels=np.zeros((2, 2), int)), "labels must have shape"),
        (dict(labels=[0, 1], num_samples=3), "num_samples"),
        (dict(labels=None), "labels"),
        (dict(labels=[0], guidance=1.0), "guidance"),
        (dict(labels=[0], guidance=[0.2, -0.1]), "guidance"),
        (dict(labels=[0], guidance=[[0.1]]), "guidance"),
        (dict(labels=[0], solver="gm-sde", num_substeps=2), "num_substeps"),
        (dict(labels=[0], solver="heun"), "solver"),
        (dict(labels=[0], num_steps=0), "num_steps"),
        (dict(labels=[0], shift=0.0), "shift"),
    ],
)
def test_bad_arguments_raise_naming_them(sampler, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampler.sample(0, **kwargs)


def test_missing_and_damaged_checkpoints(workdir, tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nowhere"))):
        Sampler.from_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoint in"):
        Sampler.from_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="step 7 not found"):
        Sampler.from_checkpoint(str(workdir), step=7)
    # truncate a file of the newest step: detected by the trainer's manifest; the previous step is used
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    state_dir = copy / "checkpoints" / "4" / "state"
    victim = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:10])
    assert Sampler.from_checkpoint(str(copy)).step == 2
    with pytest.raises(SamplingCheckpointError, match="has 10 bytes") as info:
        Sampler.from_checkpoint(str(copy), step=4)
    assert isinstance(info.value, ValueError) and isinstance(info.value, ckpt_lib.CheckpointError)
    assert (copy / "checkpoints" / "4").is_dir()  # a reader never moves the trainer's files


def test_toy_points_sampler():
    from gmflow_jax.model_builder import build_model
    from gmflow_jax.train_config import toy_model_config
    from gmflow_jax.train_state import split_params

    config = ml_collections.ConfigDict({"model": toy_model_config(num_gaussians=4)})
    config.model.hidden, config.model.num_layers = 16, 1
    graphdef, params = split_params(build_model(config.model, nnx.Rngs(0)))
    s = Sampler(graphdef, nnx.to_pure_dict(params), config)
    x = s.sample(0, num_samples=33, solver="gm-sde", order=1, num_steps=2)
    assert x.shape == (33, 2) and np.all(np.isfinite(x))
    with pytest.raises(ValueError, match="labels must be None"):
        s.sample(0, labels=[0, 1])
    with pytest.raises(ValueError, match="guidance"):
        s.sample(0, num_samples=4, guidance=0.2)


def test_cli_writes_npz_and_png(workdir, tmp_path):
    out = tmp_path / "cli" / "samples.npz"
    cmd = [sys.executable, "-m", "gmflow_jax.sampling", f"--workdir={workdir}", f"--out={out}"]
    cmd += ["--num_per_class=2", "--steps=2", "--solver=gm-sde", "--guidance", "0", "0.3"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with np.load(out) as f:
        assert f["samples"].shape == (2, 20, 8, 8, 1) and np.all(np.isfinite(f["samples"]))
        np.testing.assert_array_equal(f["labels"], np.repeat(np.arange(10), 2))
        np.testing.assert_allclose(f["guidance"], [0.0, 0.3])
        assert int(f["step"]) == 4
    assert (tmp_path / "cli" / "samples_w0.png").is_file() and (tmp_path / "cli" / "samples_w0.3.png").is_file()
    # errors: exit status 1 and a message naming the path (in-process: same code path, no second start-up)
    assert main([f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path / 'x.npz'}"]) == 1
