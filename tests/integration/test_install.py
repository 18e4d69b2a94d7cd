"""``pip install .`` as a user does it: the wheel declares its dependencies, ships the configs, and the
installed package (outside the repository) loads configs, samples and runs the demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("gmflow_jax", "configs", "pyproject.toml", "README.md", "LICENSE")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the build leaves nothing in the repository)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (path,) = out.glob("gmflow_jax-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return target


def run_installed(target: Path, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Python with the installed package first on the path, outside the repository."""
    env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_wheel_metadata_and_contents(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(z.read(meta_name).decode())
    requires = {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
                for r in meta.get_all("Requires-Dist")}  # fmt: skip
    for dep in ("jax", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "grain", "ml_collections", "clu"):
        assert dep.lower() in requires, (dep, sorted(requires))
    assert {"tpu", "cuda", "test"} <= set(meta.get_all("Provides-Extra"))
    assert meta["License-Expression"] == "Apache-2.0"
    for path in (
        "gmflow_jax/configs/digits_gmdit.py",
        "gmflow_jax/configs/imagenet_gmdit_k8.py",
        "gmflow_jax/sampling/__main__.py",
        "gmflow_jax/train/__main__.py",
        "gmflow_jax/demo/__main__.py",
        "gmflow_jax/models/factory.py",
        "gmflow_jax/data/device.py",
        "gmflow_jax/sampling/imagenet_classes.txt",
    ):
        assert path in names, path


def test_installed_package_loads_configs_and_runs_the_demo(installed, tmp_path):
    check = (
        "import gmflow_jax, sys; from gmflow_jax.train.config import load_config, packaged_configs; "
        f"assert gmflow_jax.__file__.startswith({str(installed)!r}), gmflow_jax.__file__; "
        "from gmflow_jax.sampling.labels import class_index; "
        "c = load_config('imagenet_gmdit_k8'); i = class_index(c).ids(['golden retriever', 'toilet paper']); "
        "print(packaged_configs(), load_config('digits_gmdit:tiny').model.hidden_size, i)"
    )
    result = run_installed(installed, tmp_path, "-c", check)
    assert result.returncode == 0, result.stderr[-3000:]
    packaged = ["checkerboard_k64", "checkerboard_piflow", "digits_gmdit", "digits_piflow", "imagenet_gmdit_k8"]
    assert f"{packaged + ['imagenet_piflow_k32']} 32 [207, 999]" in result.stdout
    flags = ["--config=digits_gmdit:tiny", "--train_steps=4", "--eval_per_class=2", "--steps=2"]
    result = run_installed(
        installed, tmp_path, "-m", "gmflow_jax.demo", "--workdir=demo", f"--data_dir={tmp_path / 'tfds'}", *flags
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "demo" / "demo_overview.png").is_file() and (tmp_path / "demo" / "metrics.json").is_file()
    with np.load(tmp_path / "demo" / "demo_samples.npz") as f:
        assert f["gmode2_w0"].shape == (20, 8, 8, 1)
