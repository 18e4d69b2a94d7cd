"""``gmflow_jax.sampling.Sampler``: a tiny digits GM-DiT trained 4 steps by the trainer, then sampled from its
checkpoints."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gmflow_jax import checkpoint as ckpt_lib
from gmflow_jax.sampling import Sampler, SamplingCheckpointError


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A one-block GM-DiT (K = 2, SpectrumMLP) trained 4 steps on the digits; checkpoints at steps 2 and 4."""
    from gmflow_jax.train import train
    from gmflow_jax.train.config import load_config

    c = load_config("digits_gmdit:tiny")
    c.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    c.num_steps = 4
    c.checkpoint.every_steps, c.checkpoint.async_save = 2, False
    wd = tmp_path_factory.mktemp("run")
    train(c, str(wd))
    return wd


@pytest.fixture(scope="module")
def sampler(workdir) -> Sampler:
    return Sampler.from_checkpoint(str(workdir))


def test_from_checkpoint_shapes_and_paths(workdir, sampler):
    assert sampler.step == 4 and sampler.data_shape == (8, 8, 1)
    assert sampler.num_classes == 10 and sampler.null_label == 10 and sampler.has_spectrum
    assert ckpt_lib.list_steps(str(workdir / ckpt_lib.CHECKPOINT_DIR)) == [2, 4]
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
    from gmflow_jax.models.factory import build_model, split_params
    from gmflow_jax.train.config import toy_model_config

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


def test_one_key_per_call(sampler):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    with pytest.raises(ValueError, match=r"key must be one PRNG key or an int seed; got an array of shape \(3, 2\)"):
        sampler.sample(keys, sampler.class_grid(1))


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_baselines_default_to_plain_cfg(sampler, solver):
    labels = sampler.class_grid(1)
    kw = dict(solver=solver, num_steps=3, guidance=2.0)
    default = sampler.sample(0, labels, **kw)
    np.testing.assert_array_equal(default, sampler.sample(0, labels, orthogonal=0.0, **kw))
    assert not np.allclose(default, sampler.sample(0, labels, orthogonal=1.0, **kw))


def test_given_noise_reproduces_the_drawn_noise(sampler):
    from gmflow_jax.sampling import NOISE_KEY

    labels = sampler.class_grid(1)
    key = jax.random.PRNGKey(5)
    k_noise = jax.random.fold_in(key, NOISE_KEY)
    noise = np.stack([jax.random.normal(jax.random.fold_in(k_noise, i), sampler.data_shape) for i in range(10)])
    drawn = sampler.sample(key, labels, num_steps=2)
    given = sampler.sample(key, labels, num_steps=2, noise=noise, batch_size=4)
    np.testing.assert_allclose(given, drawn, atol=1e-4 * float(np.abs(drawn).max()))  # other batch: other fusion
    other = sampler.sample(key, labels, num_steps=2, noise=noise[::-1].copy())
    np.testing.assert_allclose(other[::-1], drawn, atol=1e-4 * float(np.abs(drawn).max()))  # GM-ODE: per-sample
    with pytest.raises(ValueError, match=r"noise must have shape \(N, \*\(8, 8, 1\)\)"):
        sampler.sample(key, labels, noise=noise[..., 0])
    with pytest.raises(ValueError, match="noise has 10 samples but there are 3"):
        sampler.sample(key, labels[:3], noise=noise)
    with pytest.raises(ValueError, match="config.model.vae is ''"):
        sampler.sample(key, labels, num_steps=2, decode=True)
