"""``Sampler`` on a pi-Flow student (``config.distill.nfe >= 1``): ``solver='piflow'`` against ``piflow.piflow_sample``
called directly, the defaults from ``config.distill``, the one-line refusals, decoding, the command line and the
evaluation's sampling stage."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gmflow_jax import piflow
from gmflow_jax.convert import write_workdir
from gmflow_jax.models.factory import build_model, split_params
from gmflow_jax.sampling import NOISE_KEY, Sampler
from gmflow_jax.train.config import base_config

SHAPE, NFE, SUBSTEPS, TEMPERATURE = (8, 8, 4), 2, 16, 0.7


def _student_config(nfe: int = NFE) -> ml_collections.ConfigDict:
    c = base_config()
    m = c.model
    m.input_size, m.in_channels, m.num_gaussians, m.num_classes = SHAPE[0], SHAPE[2], 4, 10
    m.patch_size, m.hidden_size, m.depth, m.num_heads, m.logstd_inner_dim = 2, 32, 1, 2, 16
    m.spectrum = False
    c.distill.nfe, c.distill.total_substeps, c.distill.temperature = nfe, SUBSTEPS, TEMPERATURE
    return c


def _random_params(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, dict]:
    """A model of ``config.model`` with every parameter drawn (the zero-initialised heads too)."""
    graphdef, params = split_params(build_model(config.model, nnx.Rngs(0), remat=False))
    rng = np.random.RandomState(1)
    pure = jax.tree.map(
        lambda a: np.asarray(a) + 0.2 * rng.randn(*a.shape).astype(np.float32), nnx.to_pure_dict(params)
    )
    return graphdef, pure


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny student workdir (one block, K = 4, latents 8×8×4 with a random 3-level VAE): its path and EMA params."""
    pytest.importorskip("diffusers")
    from gmflow_jax.data.synthetic import write_random_vae

    workdir = tmp_path_factory.mktemp("student")
    config = _student_config()
    config.model.vae = "vae"
    write_random_vae(workdir / "vae", seed=1, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8)
    graphdef, pure = _random_params(config)
    write_workdir(str(workdir), config, pure)
    return workdir, graphdef, pure


@pytest.fixture(scope="module")
def sampler(student):
    return Sampler.from_checkpoint(str(student[0]))


def _direct(graphdef, pure, key, labels, **kw) -> np.ndarray:
    """``piflow_sample`` on the network with the given params, noise drawn per sample from ``fold_in(key, i)``."""
    k_noise = jax.random.fold_in(key, NOISE_KEY)
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(k_noise, i), SHAPE) for i in range(len(labels))])
    net = nnx.merge(graphdef, pure).net
    return np.asarray(jax.jit(lambda x, y: piflow.piflow_sample(net, x, y, **kw))(noise, jnp.asarray(labels)))


def test_piflow_equals_piflow_sample_with_the_ema_params(student, sampler):
    _, graphdef, pure = student
    key, labels = jax.random.PRNGKey(3), np.array([0, 3, 7, 9, 1], np.int32)
    assert sampler.is_student and sampler.default_solver == "piflow"
    x = sampler.sample(key, labels=labels, solver="piflow", num_steps=NFE)
    expected = _direct(
        graphdef, pure, key, labels, num_steps=NFE, total_substeps=SUBSTEPS, temperature=TEMPERATURE, shift=1.0
    )
    err = float(np.abs(x - expected).max() / np.abs(expected).max())
    print(f"Sampler piflow vs piflow_sample: max relative error {err:.1e}")
    assert x.shape == (5, *SHAPE) and x.dtype == np.float32 and err < 1e-5
    # the defaults are the config's solver, NFE and policy settings: the same compiled function, the same samples
    np.testing.assert_array_equal(sampler.sample(key, labels=labels), x)
    assert list(sampler.traces.values()) == [1]
    # samples do not depend on the chunking (noise per sample index)
    chunked = sampler.sample(key, labels=labels, batch_size=2)
    np.testing.assert_allclose(chunked, x, atol=1e-5 * float(np.abs(x).max()))


def test_policy_settings_are_traced_or_static_as_documented(student, sampler):
    _, graphdef, pure = student
    labels = np.array([2, 5], np.int32)
    before = dict(sampler.traces)
    hot = sampler.sample(1, labels=labels, temperature=1.0)
    cold = sampler.sample(1, labels=labels, temperature=0.3)
    assert not np.allclose(hot, cold)  # the temperature matters (on the first of the two steps)
    expected = _direct(graphdef, pure, jax.random.PRNGKey(1), labels, num_steps=NFE, total_substeps=SUBSTEPS)
    np.testing.assert_allclose(hot, expected, atol=1e-5 * float(np.abs(expected).max()))
    sampler.sample(1, labels=labels, final_step_size_scale=0.5, shift=2.0)  # traced: no new compilation
    one = sampler.sample(1, labels=labels, num_steps=1, total_substeps=8)  # static: a new one
    assert one.shape == (2, *SHAPE) and np.all(np.isfinite(one))
    new = {k[2:4]: v - before.get(k, 0) for k, v in sampler.traces.items() if v - before.get(k, 0)}
    assert new == {(1, 8): 1}, new  # the traced settings (and a batch size traced before) compiled nothing new


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(guidance=0.1), "guidance is baked into a pi-Flow student"),
        (dict(guidance=[0.0, 0.2]), "guidance is baked into a pi-Flow student"),
        (dict(orthogonal=1.0), "guidance is baked into a pi-Flow student"),
        (dict(solver="gm-ode"), r"solver='gm-ode': this model is a pi-Flow student \(config.distill.nfe = 2\)"),
        (dict(num_steps=0), "num_steps must be an integer >= 1; got 0"),
        (dict(total_substeps=0), "total_substeps must be an integer >= 1; got 0"),
        (dict(temperature=0.0), "temperature must be a number > 0; got 0.0"),
        (dict(final_step_size_scale=-1.0), "final_step_size_scale must be a number > 0"),
        (dict(num_substeps=4), "num_substeps is GM-ODE's"),
        (dict(solver="heun"), "solver must be one of"),
    ],
)
def test_student_refusals_are_one_line(sampler, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        sampler.sample(0, labels=[1], **kwargs)
    assert "\n" not in str(info.value)


def test_models_that_are_not_students(sampler):
    config = _student_config(nfe=0)
    graphdef, pure = _random_params(config)
    teacher = Sampler(graphdef, pure, config)
    with pytest.raises(ValueError, match=r"is not a pi-Flow student \(config.distill.nfe = 0\)"):
        teacher.sample(0, labels=[1], solver="piflow")
    with pytest.raises(ValueError, match="temperature is a setting of solver='piflow'"):
        teacher.sample(0, labels=[1], temperature=0.5)
    # a run whose config predates the distill section is not a student either; its default stays GM-ODE
    old = ml_collections.ConfigDict({k: v for k, v in config.items() if k != "distill"})
    legacy = Sampler(graphdef, pure, old)
    assert not legacy.is_student and legacy.settings() == {"solver": "gm-ode", "num_steps": 8, "shift": 1.0}
    assert legacy.sample(0, labels=[1, 2], num_steps=1).shape == (2, *SHAPE)
    with pytest.raises(ValueError, match=r"config.distill.nfe = 0"):
        legacy.sample(0, labels=[1], solver="piflow")


def test_decode(sampler):
    latents = sampler.sample(0, labels=[4, 8])
    images = sampler.sample(0, labels=[4, 8], decode=True)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, sampler.decode(latents))


def test_command_line_and_evaluation(student, sampler, tmp_path):
    from gmflow_jax.evaluate.sampling import Setting, evaluate_samples
    from gmflow_jax.storage import open_npz

    workdir = str(student[0])
    out = tmp_path / "s.npz"
    cmd = [sys.executable, "-m", "gmflow_jax.sampling", f"--workdir={workdir}", f"--out={out}", "--num_per_class=1"]
    result = subprocess.run([*cmd, "--nopng"], capture_output=True, text=True, timeout=300)  # solver, NFE: defaults
    assert result.returncode == 0, result.stderr[-3000:]
    with open_npz(out) as f:
        settings = json.loads(str(f["settings"]))
        np.testing.assert_allclose(f["samples"], sampler.sample(0, labels=np.arange(10)), atol=1e-5)
    assert settings["solver"] == "piflow" and settings["num_steps"] == NFE and settings["temperature"] == TEMPERATURE

    rows = evaluate_samples(sampler, tmp_path / "eval", Setting(), [0.0], num_samples=3, chunk_size=4)
    assert [r["network_evals_per_sample"] for r in rows] == [NFE] and rows[0]["solver"] == "piflow"
    assert rows[0]["samples"].endswith(f"piflow_{NFE}x{SUBSTEPS}_T{TEMPERATURE:g}_w0/samples.npz")
    with open_npz(rows[0]["samples"]) as f:
        assert f["arr_0"].shape == (3, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    with pytest.raises(ValueError, match="guidance is baked into a pi-Flow student"):
        evaluate_samples(sampler, tmp_path / "eval", Setting(solver="piflow"), [0.0, 0.1], num_samples=3, chunk_size=4)
