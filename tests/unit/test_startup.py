"""Start-up of the command lines: no libtpu probe (and its alarming messages) on a machine without a TPU, no PyTorch
imported for the TensorBoard writer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gmflow_jax import cli

# What libtpu prints when it probes for a TPU that is not there.
NOISE = ("could not determine TPU", "unexpected worker hostname", "E0000", "Unable to initialize backend")


def fake_machine(root: Path, *files: str, pci: dict[str, tuple[str, str]] | None = None) -> str:
    """A root with device files ``files`` (e.g. 'dev/accel0') and PCI devices {slot: (vendor, device)}."""
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).touch()
    for slot, (vendor, device) in (pci or {}).items():
        d = root / "sys/bus/pci/devices" / slot
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")
    return str(root)


@pytest.mark.parametrize(
    "files,pci,expected",
    [
        ((), {}, "cpu"),
        (("dev/null",), {"0000:00:04.0": ("0x1ae0", "0x0042"), "0000:00:05.0": ("0x1af4", "0x1000")}, "cpu"),  # gVNIC
        (("dev/accel0",), {}, None),  # TPU v2-v4
        (("dev/vfio/0", "dev/vfio/vfio"), {}, None),  # TPU v5e, v5p, v6e
        ((), {"0000:00:04.0": ("0x1ae0", "0x0062")}, None),  # a v5p chip on the PCI bus
        (("dev/kfd",), {}, None),  # AMD GPU: JAX's own choice
    ],
)
def test_platforms_without_tpu(tmp_path, files, pci, expected):
    assert cli.platforms_without_tpu(fake_machine(tmp_path, *files, pci=pci)) == expected


@pytest.mark.parametrize("plugin,expected", [(True, "cuda,cpu"), (False, None)])
def test_platforms_without_tpu_on_nvidia(tmp_path, monkeypatch, plugin, expected):
    monkeypatch.setattr(cli, "_cuda_plugin_installed", lambda: plugin)
    assert cli.platforms_without_tpu(fake_machine(tmp_path, "dev/nvidia0", "dev/nvidiactl")) == expected


def run_without_jax_platforms(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # conftest sets it for the tests
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.skipif(cli.platforms_without_tpu() != "cpu", reason="a machine with accelerator device files")
def test_commands_start_quietly_on_a_cpu_machine(tmp_path):
    # JAX imported before the command's shared module (as gmflow_jax.evaluate does): its config is told
    code = "import jax; from gmflow_jax import cli; print(jax.devices()[0].platform, jax.config.jax_platforms)"
    result = run_without_jax_platforms("-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["cpu", "cpu"]
    assert not [n for n in NOISE if n in result.stderr], result.stderr[-3000:]
    # a command that starts JAX's backends (the mesh; before this change libtpu spoke here) and then stops with
    # one error line: no dataset in an empty data_dir
    args = ["--config=imagenet_gmdit_k8:tiny", f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path}"]
    result = run_without_jax_platforms("-m", "gmflow_jax.train", *args)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("gmflow_jax.train: error: dataset"), result.stderr[-3000:]
    assert not [n for n in NOISE if n in result.stderr + result.stdout], result.stderr[-3000:]


def test_the_users_jax_platforms_is_kept():
    code = "from gmflow_jax import cli; import jax; print(jax.config.jax_platforms)"
    env = dict(os.environ, JAX_PLATFORMS="")  # '' = JAX's own choice
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip() in ("", "None"), result.stderr[-3000:]


# A softmax's reductions, compiled by XLA:CPU: what the flag moves out of YNNPACK.
SOFTMAX_HLO = (
    "import jax, jax.numpy as jnp; from gmflow_jax import cli; x = jnp.ones((64, 8, 8, 32));"
    " f = jax.jit(lambda x: jnp.sum(jnp.exp(x - jnp.max(x, -1, keepdims=True)), -1));"
    " print(f.lower(x).compile().as_text().count('__ynn_fusion'))"
)


@pytest.mark.parametrize(
    ("user_flags", "expected_flags", "ynn_fusions"),
    [
        ("", cli.CPU_REDUCTIONS_FLAG, 0),
        (
            "--xla_force_host_platform_device_count=2",
            f"--xla_force_host_platform_device_count=2 {cli.CPU_REDUCTIONS_FLAG}",
            0,
        ),
        ("--xla_cpu_experimental_ynn_fusion_type=+reduce", "--xla_cpu_experimental_ynn_fusion_type=+reduce", 1),
    ],
)
def test_cpu_reductions_stay_in_xla_unless_the_user_says(monkeypatch, user_flags, expected_flags, ynn_fusions):
    monkeypatch.setenv("XLA_FLAGS", user_flags)
    cli.keep_cpu_reductions_in_xla()
    cli.keep_cpu_reductions_in_xla()  # idempotent
    assert os.environ["XLA_FLAGS"] == expected_flags
    # JAX imported first, the shared module before the backend starts (as the commands do); the library default
    # (+reduce) puts the softmax in a YNNPACK fusion: when a jaxlib stops doing so, the flag can go
    env = dict(os.environ, XLA_FLAGS=user_flags, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SOFTMAX_HLO], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[-1]) == ynn_fusions


def test_the_tensorboard_writer_does_not_import_torch(tmp_path):
    pytest.importorskip("torch")  # on a host with torch: tensorboardX imports it unless it is hidden
    code = f"""
import sys
from gmflow_jax.train.writers import create_writer
writer = create_writer({str(tmp_path)!r})
writer.write_scalars(3, {{"loss": 0.5}})
writer.write_images(3, {{"samples": __import__("numpy").zeros((2, 4, 4, 3), "uint8")}})
writer.close()
print("torch" in sys.modules)
import torch
print(torch.zeros(2).numpy().tolist())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["False", "[0.0, 0.0]"], result.stdout
    (events,) = tmp_path.glob("*tfevents*")
    assert events.stat().st_size > 0
