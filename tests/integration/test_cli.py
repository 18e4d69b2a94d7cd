"""The command lines as a user runs them: train -> sample, and one-line errors for the usual mistakes."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helpers import DIT, error_line, run, train_cmd


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """``python -m gmflow_jax.train --config digits_gmdit:tiny``, 4 steps, checkpoints at 2 and 4."""
    wd = tmp_path_factory.mktemp("run")
    data = tmp_path_factory.mktemp("tfds")
    result = run(train_cmd(DIT, wd, data, "--config.num_steps=4", "--config.checkpoint.every_steps=2"))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Unable to initialize backend" not in result.stdout  # no INFO line about a missing TPU
    assert "hyperparameters:\n" in result.stdout and all(len(line) < 400 for line in result.stdout.splitlines())
    return wd


def sampling_cmd(*flags: str) -> list[str]:
    return [sys.executable, "-m", "gmflow_jax.sampling", *flags]


def test_sampling_cli_writes_npz_and_png(workdir, tmp_path):
    out = tmp_path / "cli" / "samples.npz"
    flags = ["--num_per_class=2", "--steps=2", "--solver=gm-sde", "--guidance=0,0.3"]
    result = run(sampling_cmd(f"--workdir={workdir}", f"--out={out}", *flags))
    assert result.returncode == 0, result.stdout[-3000:]
    with np.load(out) as f:
        assert f["samples"].shape == (2, 20, 8, 8, 1) and np.all(np.isfinite(f["samples"]))
        np.testing.assert_array_equal(f["labels"], np.repeat(np.arange(10), 2))
        np.testing.assert_allclose(f["guidance"], [0.0, 0.3])
        assert int(f["step"]) == 4
    assert (tmp_path / "cli" / "samples_w0.png").is_file() and (tmp_path / "cli" / "samples_w0.3.png").is_file()


@pytest.mark.parametrize(
    "flags,code,message",
    [
        (("--config.num_stepz=3",), 2, r'gmflow_jax.train: error: .*num_stepz.*Did you mean "num_steps"'),
        (("--config.num_steps=abc",), 2, r"gmflow_jax.train: error: .*num_steps"),
        (("--config.optim.lr=-1.0",), 1, r"gmflow_jax.train: error: config\.optim\.lr must be a number > 0\.0"),
        (("--verbos",), 2, r"gmflow_jax.train: error: .*verbos"),
    ],
)
def test_train_cli_errors_are_one_line(tmp_path, flags, code, message):
    result = run(train_cmd(DIT, tmp_path / "w", tmp_path / "tfds", *flags))
    assert re.search(message, error_line(result, code)), result.stdout[-2000:]


def test_missing_config_file_and_verbose_traceback(tmp_path):
    cmd = [sys.executable, "-m", "gmflow_jax.train", "--config=configs/nope.py", f"--workdir={tmp_path}"]
    line = error_line(run(cmd), 2)
    assert "config file 'configs/nope.py' does not exist" in line
    assert "Traceback" in run([*cmd, "--verbose"]).stdout


def test_sampling_cli_errors_are_one_line(workdir, tmp_path):
    line = error_line(run(sampling_cmd(f"--workdir={tmp_path / 'missing'}", f"--out={tmp_path / 'x.npz'}")), 1)
    assert line.startswith("gmflow_jax.sampling: error: ") and str(tmp_path / "missing") in line
    line = error_line(run(sampling_cmd(f"--workdir={workdir}", f"--out={tmp_path / 'x.npz'}", "--guidance=1.5")), 1)
    assert "guidance" in line and "[0, 1)" in line
