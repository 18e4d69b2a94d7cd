"""Real processes: ``python -m gmflow_jax.data.build_imagenet`` on a tiny synthetic ImageNet, then the trainer on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from train_helpers import checkpoint_steps, error_line, run, train_cmd, two_processes

from gmflow_jax.data import synthetic
from gmflow_jax.models.vae import VAEConfig

TINY_VAE = dict(
    block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32
)


def build_cmd(source, data_dir, vae, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gmflow_jax.data.build_imagenet",
        f"--source={source}",
        f"--data_dir={data_dir}",
        f"--vae={vae}",
        "--image_size=32",
        *flags,
    ]


def test_build_then_train(tmp_path):
    # 3 synsets × 6 JPEGs of varied sizes (one CMYK, one grayscale) + one corrupt file
    src = synthetic.write_synthetic_imagenet(tmp_path / "ILSVRC2012_img_train")
    vae = synthetic.write_random_vae(tmp_path / "vae", **TINY_VAE)
    data = tmp_path / "data"

    result = run(build_cmd(src, data, vae, "--shard_size=8", "--batch_size=4"), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "skipping n01442764/n01442764_corrupt.JPEG" in result.stdout
    assert "images/s, ETA" in result.stdout and "imagenet_latents built in" in result.stdout

    # two JAX processes (loopback), each encoding every other shard, write the same files
    logs = two_processes(
        lambda *f: build_cmd(src, tmp_path / "data2", vae, "--shard_size=8", "--batch_size=4", *f), tmp_path, "b"
    )
    assert "shard 2/2 written" in logs[0] and "shard 1/1 written" in logs[1]  # shards 0, 2 and 1
    # the same dataset: metadata byte for byte, the same records; the latents agree to float32 rounding (XLA's
    # CPU convolutions in two processes under load are not bit-reproducible; in one process they are, see
    # tests/unit/test_imagenet.py)
    version = Path("imagenet_latents") / "1.0.0"
    for name in ("metadata.json", "features.json"):
        assert (data / version / name).read_bytes() == (tmp_path / "data2" / version / name).read_bytes()
    one, two = (
        tfds.data_source("imagenet_latents", data_dir=str(d), split="train") for d in (data, tmp_path / "data2")
    )
    assert len(one) == len(two) == 18
    for i in range(len(one)):
        assert one[i]["label"] == two[i]["label"]
        np.testing.assert_allclose(one[i]["latent"], two[i]["latent"], rtol=1e-5, atol=1e-6)

    workdir = tmp_path / "run"
    cmd = train_cmd("imagenet_gmdit_k8:tiny", workdir, data, f"--config.model.vae={vae}", "--config.num_steps=3")
    result = run(cmd, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "dataset imagenet_latents (18 examples)" in result.stdout
    assert checkpoint_steps(workdir) == [3]


def test_command_line_errors(tmp_path):
    src = synthetic.write_synthetic_imagenet(tmp_path / "src", num_synsets=1, per_class=1)
    no_weights = tmp_path / "vae_without_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(VAEConfig().to_dict()))
    line = error_line(run(build_cmd(tmp_path / "missing", tmp_path / "d", no_weights)), 1)
    assert "--source" in line and "does not exist" in line
    line = error_line(run(build_cmd(tmp_path, tmp_path / "d", no_weights)), 1)
    assert "no synset folders" in line
    line = error_line(run(build_cmd(src, tmp_path / "d", src)), 1)
    assert "has no config.json" in line
    line = error_line(run(build_cmd(src, tmp_path / "d", no_weights)), 1)
    assert "has no diffusion_pytorch_model.safetensors" in line
    line = error_line(
        run(train_cmd("imagenet_gmdit_k8:tiny", tmp_path / "w", tmp_path / "d", "--config.num_steps=1")), 1
    )
    assert "not built in" in line and "build_imagenet" in line
