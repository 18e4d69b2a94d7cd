"""The NNX AutoencoderKL against diffusers' PyTorch one (random weights, small config), its loader and encode/decode.

Parity norm: max |ours − reference| / max |reference| over the whole output, reference = diffusers in float64.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from gmflow_jax.models.vae import AutoencoderKL, VAEConfig, convert_vae_state_dict, load_vae  # noqa: E402
from gmflow_jax.models.vae_apply import decode, encode  # noqa: E402

CONFIG = VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)
RTOL = 1e-4
ATTN = "encoder.mid_block.attentions.0"


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def torch_vae():
    """diffusers AutoencoderKL of CONFIG with every parameter randomised (fixed seed), float32."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL.from_config(CONFIG.to_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # fan-in scaled weights
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # GroupNorm scales
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def folder(torch_vae, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    torch_vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(folder):
    return load_vae(str(folder))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def params_of(model: AutoencoderKL) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_trees_equal(a, b):
    flat_a, flat_b = nnx.traversals.flatten_mapping(a), nnx.traversals.flatten_mapping(b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=str(k))


def test_parity_with_diffusers_float64(torch_vae, vae):
    ref = copy.deepcopy(torch_vae).double()
    x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3))
    z = np.random.default_rng(2).standard_normal((2, 8, 8, 4))
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        ref_out = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    mean, logvar = vae.encode_moments(jnp.asarray(x, jnp.float32))
    out = vae.decode_latents(jnp.asarray(z, jnp.float32))
    assert mean.dtype == logvar.dtype == out.dtype == jnp.float32
    assert mean.shape == logvar.shape == (2, 8, 8, 4) and out.shape == (2, 32, 32, 3)
    errors = {
        "mean": rel_err(mean, nhwc(post.mean)),
        "logvar": rel_err(logvar, nhwc(post.logvar)),
        "decoder": rel_err(out, nhwc(ref_out)),
    }
    print("relative errors (max abs err / max abs ref):", errors)
    assert all(e < RTOL for e in errors.values()), errors


def test_bfloat16_compute(folder, vae):
    """dtype=bfloat16 computes in bf16 (params stay float32) and still returns float32 close to the f32 model."""
    half = load_vae(str(folder), dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(half, nnx.Param)))
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 32, 32, 3)), jnp.float32)
    (mean, _), (ref, _) = half.encode_moments(x), vae.encode_moments(x)
    assert mean.dtype == jnp.float32 and 1e-5 < rel_err(mean, np.asarray(ref)) < 5e-2


def test_config_round_trip_and_errors(torch_vae):
    assert VAEConfig.from_dict(dict(torch_vae.config)) == CONFIG
    assert VAEConfig.from_dict(json.loads(json.dumps(CONFIG.to_dict()))) == CONFIG
    assert VAEConfig().downsample_factor == 8 and CONFIG.downsample_factor == 4
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_dict({**CONFIG.to_dict(), "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="use_quant_conv"):
        VAEConfig.from_dict({**CONFIG.to_dict(), "use_quant_conv": False})
    with pytest.raises(ValueError, match="block_out_channels"):
        VAEConfig(block_out_channels=(16, 20), norm_num_groups=8)


@pytest.mark.parametrize("variant", ["fp16", "bf16"])
def test_load_variant_files(torch_vae, folder, tmp_path, variant):
    """Only a variant file present: it is read (bf16 / fp16 -> float32) and matches the rounded weights."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[variant]
    if variant == "fp16":
        copy.deepcopy(torch_vae).to(dtype).save_pretrained(tmp_path, variant="fp16")
    else:
        sd = {k: v.to(dtype).contiguous() for k, v in torch_vae.state_dict().items()}
        safetensors_torch.save_file(sd, tmp_path / "diffusion_pytorch_model.bf16.safetensors")
        (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_vae(str(tmp_path))
    assert loaded.config == CONFIG
    rounded = {k: v.to(dtype).float() for k, v in torch_vae.state_dict().items()}
    assert_trees_equal(params_of(loaded), convert_vae_state_dict(rounded, CONFIG))


def test_legacy_attention_names(torch_vae, vae):
    """query/key/value/proj_attn with 1×1-conv (4-D) weights convert to the same model."""
    legacy = dict(torch_vae.state_dict())
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
        for block in ("encoder", "decoder"):
            a = f"{block}.mid_block.attentions.0"
            w = legacy.pop(f"{a}.{new}.weight")
            legacy[f"{a}.{old}.weight"] = w[:, :, None, None]
            legacy[f"{a}.{old}.bias"] = legacy.pop(f"{a}.{new}.bias")
    assert_trees_equal(convert_vae_state_dict(legacy, CONFIG), params_of(vae))


def test_load_errors(torch_vae, folder, tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_vae(str(tmp_path))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        load_vae(str(tmp_path))
    sd = {k: v.contiguous() for k, v in torch_vae.state_dict().items()}
    missing = dict(sd)
    del missing[f"{ATTN}.to_k.bias"]
    safetensors_torch.save_file(missing, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=rf"{ATTN}\.to_k\.bias"):
        load_vae(str(tmp_path))
    bad = {**sd, "decoder.conv_in.weight": torch.zeros(32, 4, 1, 1)}
    with pytest.raises(ValueError, match=r"'decoder\.conv_in\.weight' has shape \(32, 4, 1, 1\).*\(32, 4, 3, 3\)"):
        convert_vae_state_dict(bad, CONFIG)
    with pytest.raises(ValueError, match="extra.weight"):
        convert_vae_state_dict({**sd, "extra.weight": torch.zeros(1)}, CONFIG)


def test_encode_decode(vae, images):
    s = CONFIG.scaling_factor
    lat = encode(vae, images)  # 3 images: odd batch
    assert lat.shape == (3, 8, 8, 4) and lat.dtype == jnp.float32
    mean, _ = vae.encode_moments(jnp.asarray(images, jnp.float32) * (2.0 / 255.0) - 1.0)
    np.testing.assert_allclose(lat, mean * s, rtol=1e-5, atol=1e-5 * float(jnp.abs(mean).max()) * s)
    floats = 2.0 * images.astype(np.float32) / 255.0 - 1.0
    np.testing.assert_allclose(encode(vae, floats), lat, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(encode(vae, images), lat)  # the mean path is deterministic

    out = decode(vae, lat)
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
    ref = np.clip(np.round((np.asarray(vae.decode_latents(lat / s)) + 1.0) * 127.5), 0, 255)
    assert np.abs(out.astype(np.int32) - ref).max() <= 1  # rounding at .5 may differ
    assert np.abs(decode(vae, np.asarray(lat)[:1]).astype(np.int32) - out[:1]).max() <= 1  # batch-size numerics
    with pytest.raises(ValueError, match=r"\(3, 30, 30, 3\)"):
        encode(vae, images[:, :30, :30])


def test_encode_sampling(vae, images):
    """ε of sample i comes from fold_in(key, i); 256 copies of one image give a Monte-Carlo check."""
    key = jax.random.key(3)
    s = CONFIG.scaling_factor
    np.testing.assert_allclose(encode(vae, images, key)[:2], encode(vae, images[:2], key), rtol=1e-5, atol=1e-6)
    k = 256
    samples = np.asarray(encode(vae, np.repeat(images[:1], k, axis=0), key), np.float64) / s
    mean, logvar = vae.encode_moments(jnp.asarray(images[:1], jnp.float32) * (2.0 / 255.0) - 1.0)
    std = np.exp(0.5 * np.asarray(logvar[0], np.float64))
    zscore = (samples.mean(0) - np.asarray(mean[0])) / (std / np.sqrt(k))
    assert np.abs(zscore).max() < 5.0  # 256 latent entries; |z| > 5 has probability ~1e-4 overall
    ratio = samples.std(0) / std
    assert 0.85 < ratio.mean() < 1.15 and ratio.min() > 0.6


def test_two_local_devices_odd_batch():
    """With 2 host devices, an odd batch is padded, split and cut back, matching the per-image results."""
    code = textwrap.dedent(
        """
        import jax, numpy as np
        from flax import nnx
        from gmflow_jax.models.vae import AutoencoderKL, VAEConfig
        from gmflow_jax.models.vae_apply import decode, encode
        assert jax.local_device_count() == 2
        vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4),
                            rngs=nnx.Rngs(0))
        x = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
        key = jax.random.key(0)
        lat = encode(vae, x, key)
        np.testing.assert_allclose(lat[:2], encode(vae, x[:2], key), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(encode(vae, x)[1:2], encode(vae, x[1:2]), rtol=1e-5, atol=1e-6)
        out = decode(vae, lat)
        assert out.shape == (3, 16, 16, 3) and out.dtype == np.uint8
        assert np.abs(decode(vae, np.asarray(lat)[1:2]).astype(int) - out[1:2]).max() <= 1
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
