"""``gmflow_jax.convert`` on the authors' pi-Flow students: folders written with random weights by the authors' GM-DiT
V2 (``authors_gmdit_v2``, their class reproduced on diffusers), converted, compared with the torch module and
sampled with ``solver='piflow'``."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from gmflow_jax.convert import convert
from gmflow_jax.sampling import Sampler

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from authors_gmdit_v2 import export_student, make_student  # noqa: E402

K, C, SIZE, CLASSES = 4, 4, 8, 10
TINY = dict(
    num_gaussians=K,
    logstd_inner_dim=16,
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=C,
    num_layers=2,
    sample_size=SIZE,
    patch_size=2,
    num_embeds_ada_norm=CLASSES,
)


@pytest.fixture(scope="module")
def tiny_student():
    return make_student(seed=0, **TINY)


def _inputs(n: int = 3, size: int = SIZE):
    x = np.random.RandomState(0).randn(n, size, size, C).astype(np.float32)
    tau = np.array([0.5, 250.3, 999.0, 731.7][:n], np.float32)
    labels = np.array([0, 3, CLASSES, 7][:n], np.int32)  # includes the null class
    return x, tau, labels


def _max_errors(sampler: Sampler, module, *, network_time_scale: float = 1000.0, size: int = SIZE) -> dict[str, float]:
    """Our GM-DiT against the authors' module on the same inputs (the module fed the time in its own scale)."""
    x, tau, labels = _inputs(size=size)
    gm = jax.jit(lambda p, x, t, y: nnx.merge(sampler.graphdef, p).net(x, t, y))(sampler.params, x, tau, labels)
    t_net = torch.from_numpy(tau) * (network_time_scale / 1000.0)
    with torch.no_grad():
        means, logweights, logstds = module(torch.from_numpy(x.transpose(0, 3, 1, 2)), t_net, torch.from_numpy(labels))
    means = means.numpy().transpose(0, 3, 4, 1, 2)  # (N, K, C, H, W) -> (N, H, W, K, C)
    logweights = logweights.numpy()[:, :, 0].transpose(0, 2, 3, 1)
    return {
        "means (relative)": float(np.abs(np.asarray(gm.means) - means).max() / np.abs(means).max()),
        "logweights (relative)": float(np.abs(np.asarray(gm.logweights) - logweights).max() / np.abs(logweights).max()),
        "logstds": float(np.abs(np.asarray(gm.logstds).ravel() - logstds.numpy().ravel()).max()),
    }


def test_authors_student_converts_matches_their_module_and_samples(tmp_path, tiny_student, caplog):
    src = tmp_path / "gmdit_k4_tiny_piid_2step"
    export_student(tiny_student, src)
    with caplog.at_level(logging.WARNING):
        convert(str(src), str(tmp_path / "run"), dtype="float32")
    assert "= 2 from the folder name" in caplog.text and "= 1000.0 from the folder name" in caplog.text
    sampler = Sampler.from_checkpoint(str(tmp_path / "run"))
    m = sampler.config.model
    assert (m.num_gaussians, m.depth, m.num_heads, m.hidden_size, m.time_scale) == (K, 2, 2, 16, 1000.0)
    assert sampler.is_student and sampler.distill["nfe"] == 2 and not sampler.has_spectrum
    errors = _max_errors(sampler, tiny_student)
    print("GM-DiT V2 student vs the authors' module, max errors:", errors)
    assert max(errors.values()) < 1e-4
    x = sampler.sample(0, labels=[1, 2, 3], solver="piflow")
    assert x.shape == (3, SIZE, SIZE, C) and np.all(np.isfinite(x))


def test_repa_students_see_sigma(tmp_path, tiny_student):
    """The authors' gmrepa_* students run with num_timesteps = 1: the network is fed σ, not 1000σ."""
    src = tmp_path / "gmrepa_k4_tiny_piid_1step"
    export_student(tiny_student, src)
    convert(str(src), str(tmp_path / "run"), dtype="float32")
    sampler = Sampler.from_checkpoint(str(tmp_path / "run"))
    assert sampler.config.model.time_scale == 1.0 and sampler.distill["nfe"] == 1
    errors = _max_errors(sampler, tiny_student, network_time_scale=1.0)
    print("REPA student (time scale 1), max errors:", errors)
    assert max(errors.values()) < 1e-4
    assert _max_errors(sampler, tiny_student)["means (relative)"] > 1e-3  # the time scale matters


def test_folder_without_config_json_uses_the_authors_defaults(tmp_path):
    """A folder loaded only through the authors' ``pretrained=``: the architecture from the weights' shapes, 72
    channels per head and sample_size 32 from their class; --nfe and --time_scale are then required."""
    module = make_student(
        seed=1, num_gaussians=2, logstd_inner_dim=16, num_attention_heads=2, num_layers=1, num_embeds_ada_norm=CLASSES
    )
    src = tmp_path / "student"
    export_student(module, src, config=False)
    with pytest.raises(ValueError, match="--nfe is required"):
        convert(str(src), str(tmp_path / "run"))
    with pytest.raises(ValueError, match="--time_scale is required"):
        convert(str(src), str(tmp_path / "run"), nfe=1)
    convert(str(src), str(tmp_path / "run"), nfe=1, time_scale=1000.0, dtype="float32")
    sampler = Sampler.from_checkpoint(str(tmp_path / "run"))
    m = sampler.config.model
    assert (m.num_heads, m.hidden_size, m.input_size, m.num_gaussians, m.logstd_inner_dim) == (2, 144, 32, 2, 16)
    errors = _max_errors(sampler, module, size=32)
    print("GM-DiT V2 student without config.json (width 144, 256 tokens), max errors:", errors)
    assert max(errors.values()) < 1e-4


def _rewrite(folder, edit_state=None, edit_config=None, metadata=None) -> None:
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    if edit_state:
        edit_state(state)
    save_file(state, path, metadata=metadata or {"policy_config": json.dumps({"type": "GMFlow"})})
    if edit_config:
        config = json.loads(open(os.path.join(folder, "config.json")).read())
        edit_config(config)
        open(os.path.join(folder, "config.json"), "w").write(json.dumps(config))


def test_student_errors_are_one_line(tmp_path, tiny_student):
    def student(name: str):
        export_student(tiny_student, tmp_path / name)
        return str(tmp_path / name)

    run = str(tmp_path / "run")
    cases = []
    v1 = student("v1_1step")
    _rewrite(v1, edit_state=lambda s: s.update({"proj_out_2.weight": s.pop("proj_out_means.weight")}))
    cases.append((v1, {}, "is not a GM-DiT V2 (pi-Flow student) folder: its weights have no proj_out_means"))
    dx = student("dx_1step")
    _rewrite(dx, metadata={"policy_config": json.dumps({"type": "DX"})})
    cases.append((dx, {}, "with a 'DX' policy; only GMFlow"))
    odd = student("odd_1step")
    _rewrite(odd, edit_config=lambda c: c.update(constant_logstd=0.5))
    cases.append((odd, {}, "constant_logstd=0.5 is not supported"))
    ok = student("gmdit_ok_1step")
    cases.append((ok, dict(nfe=0), "--nfe must be an integer >= 1"))
    cases.append((ok, dict(time_scale=0.0), "--time_scale must be > 0"))
    cases.append((ok, dict(vae=ok), "is not a diffusers AutoencoderKL folder"))
    cases.append((str(tmp_path), {}, "For a pi-Flow student, pass its own folder as --from"))  # like the hub repo root
    (tmp_path / "pipeline" / "transformer").mkdir(parents=True)
    cases.append((str(tmp_path / "pipeline"), dict(nfe=1), "--nfe is for a pi-Flow student folder"))
    for src, kwargs, match in cases:
        student_folder = src != str(tmp_path) and "pipeline" not in src
        kwargs = dict(dict(time_scale=1000.0) if student_folder else {}, **kwargs)
        with pytest.raises(ValueError, match=re.escape(match)) as info:
            convert(src, run, **kwargs)
        assert "\n" not in str(info.value), info.value
    assert not os.path.exists(run)  # every refusal before anything was written
    convert(ok, run)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        convert(ok, run)


def test_command_line(tmp_path, tiny_student):
    from gmflow_jax.data.synthetic import write_random_vae

    export_student(tiny_student, tmp_path / "student")
    write_random_vae(tmp_path / "sd-vae", seed=1, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8)
    cmd = [
        sys.executable,
        "-m",
        "gmflow_jax.convert",
        f"--from={tmp_path / 'student'}",
        f"--workdir={tmp_path / 'run'}",
    ]
    result = subprocess.run(
        [*cmd, "--nfe=1", "--time_scale=1000", f"--vae={tmp_path / 'sd-vae'}", "--dtype=float32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sampler = Sampler.from_checkpoint(str(tmp_path / "run"))
    assert sampler.distill["nfe"] == 1 and sampler.config.model.vae == "vae"
    images = sampler.sample(0, labels=[5, 6], decode=True)
    assert images.shape == (2, 4 * SIZE, 4 * SIZE, 3) and images.dtype == np.uint8
