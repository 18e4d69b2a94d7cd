"""``gmflow_jax.convert``: a published pipeline folder, written with random weights by PyTorch/diffusers/
safetensors exactly as published, converted into a workdir and sampled through the ``Sampler``."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from test_gmdit import (
    DEPTH,
    HEAD_DIM,
    HEADS,
    LOGSTD_INNER,
    NUM_CLASSES,
    PATCH,
    SIZE,
    C,
    K,
    _gmflow_layout,
    _inputs,
    _rel_err,
    _torch_reference,
    make_torch_dit,
)

from gmflow_jax import checkpoint as ckpt_lib
from gmflow_jax.convert import convert_pipeline
from gmflow_jax.sampling import Sampler

SPECTRUM_BASE = (C, 8, 8)


@pytest.fixture(scope="module")
def torch_dit():
    return make_torch_dit()


SPECTRUM_WIDTHS = (2, 64, 8, C * 8 * 8)


def write_pipeline(root, torch_dit, *, variant: str | None = None, v2: bool = False, **transformer_overrides) -> dict:
    """A GMDiTPipeline folder as published: model_index.json, transformer/, spectrum_net/, scheduler/; returns the
    torch-side references (raw head output, logstd, spectrum layers)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    stock, raw, logstd = _torch_reference(torch_dit, 0.0)  # the published model's time embedding: shift 0
    state = _gmflow_layout(stock, v2=v2)
    transformer = {
        "_class_name": "_GMDiTTransformer2DModel",
        "num_gaussians": K,
        "logstd_inner_dim": LOGSTD_INNER,
        "gm_num_logstd_layers": 2,
        "num_attention_heads": HEADS,
        "attention_head_dim": HEAD_DIM,
        "in_channels": C,
        "num_layers": DEPTH,
        "sample_size": SIZE,
        "patch_size": PATCH,
        "num_embeds_ada_norm": NUM_CLASSES,
        **transformer_overrides,
    }
    rng = np.random.RandomState(3)
    layers = [
        (rng.randn(o, i).astype(np.float32) * 0.5, rng.randn(o).astype(np.float32))
        for i, o in zip(SPECTRUM_WIDTHS[:-1], SPECTRUM_WIDTHS[1:], strict=True)
    ]
    spectrum = {}
    for j, (w, b) in enumerate(layers):
        spectrum[f"mlp.{2 * j}.weight"], spectrum[f"mlp.{2 * j}.bias"] = torch.from_numpy(w), torch.from_numpy(b)
    name = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    for folder, config, tensors in (
        ("transformer", transformer, state),
        (
            "spectrum_net",
            {"_class_name": "_SpectrumMLP", "base_size": list(SPECTRUM_BASE), "layers": [64, 8]},
            spectrum,
        ),
    ):
        os.makedirs(root / folder)
        (root / folder / "config.json").write_text(json.dumps(config))
        save_file({k: torch.as_tensor(v).to(dtype).contiguous() for k, v in tensors.items()}, str(root / folder / name))
    os.makedirs(root / "scheduler")
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "FlowEulerODEScheduler"}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "GMDiTPipeline"}))
    return {"raw": raw, "logstd": logstd, "layers": layers, "state": state}


def test_converted_sampler_matches_pytorch(tmp_path, torch_dit):
    ref = write_pipeline(tmp_path / "published", torch_dit)
    step_dir = convert_pipeline(str(tmp_path / "published"), str(tmp_path / "run"), dtype="float32")
    assert ckpt_lib.list_steps(os.path.dirname(step_dir)) == [0]
    sampler = Sampler.from_checkpoint(str(tmp_path / "run"))
    assert sampler.data_shape == (SIZE, SIZE, C) and sampler.num_classes == NUM_CLASSES and sampler.has_spectrum
    x, tau, labels = _inputs()
    gm = jax.jit(lambda p, x, t, y: nnx.merge(sampler.graphdef, p).net(x, t, y))(sampler.params, x, tau, labels)
    n, raw = x.shape[0], ref["raw"]
    assert _rel_err(gm.means, raw[..., : K * C].reshape(n, SIZE, SIZE, K, C)) < 1e-4
    logits = raw[..., K * C :]
    logweights = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(gm.logweights, logweights, atol=1e-4 * np.abs(logweights).max())
    np.testing.assert_allclose(np.asarray(gm.logstds).reshape(n, 1), ref["logstd"], rtol=1e-4, atol=1e-5)
    # the spectrum net's weights arrived (its computation is tested against NumPy in test_gmdit)
    flat = dict(nnx.traversals.flatten_mapping(sampler.params["spectrum"]))
    for j, (w, b) in enumerate(ref["layers"]):
        np.testing.assert_array_equal(flat[("layers", j, "kernel")], w.T)
        np.testing.assert_array_equal(flat[("layers", j, "bias")], b)
    # the trainer's init_from takes it like any checkpoint (params and EMA)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), sampler.params)
    params, ema = ckpt_lib.load_weights(str(tmp_path / "run"), abstract)
    np.testing.assert_array_equal(params["net"]["head"]["bias"], sampler.params["net"]["head"]["bias"])


def test_bf16_variant_and_v2_layout(tmp_path, torch_dit):
    torch = pytest.importorskip("torch")
    ref = write_pipeline(tmp_path / "published", torch_dit, variant="bf16", v2=True)
    convert_pipeline(str(tmp_path / "published"), str(tmp_path / "run"))
    sampler = Sampler.from_checkpoint(str(tmp_path / "run"))
    assert sampler.config.model.dtype == "bfloat16"  # the recipe's compute dtype; parameters are float32
    w = ref["state"]["transformer_blocks.0.attn1.to_q.weight"]
    expected = torch.as_tensor(w).to(torch.bfloat16).float().numpy().T
    np.testing.assert_array_equal(sampler.params["net"]["blocks"][0]["attn"]["query"]["kernel"], expected)


def test_conversion_errors(tmp_path, torch_dit):
    with pytest.raises(ValueError, match="is not a folder"):
        convert_pipeline(str(tmp_path / "nowhere"), str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no GM-DiT transformer folder"):
        convert_pipeline(str(tmp_path / "empty"), str(tmp_path / "run"))
    write_pipeline(tmp_path / "odd", torch_dit, gm_num_logstd_layers=3)
    with pytest.raises(ValueError, match="gm_num_logstd_layers=3 is not supported"):
        convert_pipeline(str(tmp_path / "odd"), str(tmp_path / "run"))
    write_pipeline(tmp_path / "ok", torch_dit)
    convert_pipeline(str(tmp_path / "ok"), str(tmp_path / "run"))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        convert_pipeline(str(tmp_path / "ok"), str(tmp_path / "run"))


def test_decode_through_the_published_vae(tmp_path, torch_dit):
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL

    from gmflow_jax.data.synthetic import write_random_vae

    write_pipeline(tmp_path / "published", torch_dit)
    vae_config = dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=32)
    write_random_vae(tmp_path / "published" / "vae", seed=1, **vae_config)
    convert_pipeline(str(tmp_path / "published"), str(tmp_path / "run"), dtype="float32")
    assert sorted(os.listdir(tmp_path / "run" / "vae")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    sampler = Sampler.from_checkpoint(str(tmp_path / "run"))
    latents = np.random.RandomState(0).randn(2, SIZE, SIZE, C).astype(np.float32)
    images = sampler.decode(latents)
    assert images.shape == (2, 4 * SIZE, 4 * SIZE, 3) and images.dtype == np.uint8
    reference = AutoencoderKL.from_pretrained(str(tmp_path / "published" / "vae")).eval()
    with torch.no_grad():
        x = reference.decode(torch.from_numpy(latents / 0.18215).permute(0, 3, 1, 2)).sample
    expected = np.clip(np.round((x.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5), 0, 255)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    swept = sampler.sample(0, labels=[1, 2], num_steps=1, guidance=[0.0, 0.2], decode=True)
    assert swept.shape == (2, 2, 4 * SIZE, 4 * SIZE, 3) and swept.dtype == np.uint8


def test_command_line(tmp_path, torch_dit):
    import subprocess
    import sys

    write_pipeline(tmp_path / "published", torch_dit)
    cmd = [sys.executable, "-m", "gmflow_jax.convert", f"--from={tmp_path / 'published'}"]
    result = subprocess.run([*cmd, f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Sampler.from_checkpoint(str(tmp_path / "run")).step == 0
    result = subprocess.run([*cmd, f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("gmflow_jax.convert: error: ")
    assert "already holds checkpoints" in result.stderr
