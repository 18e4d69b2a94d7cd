"""Subprocess helpers for the trainer tests: run ``python -m gmflow_jax.train`` and read its checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gmflow_jax.checkpoint import CHECKPOINT_DIR, list_steps, read_meta, restore, verify_step
from gmflow_jax.fake_gcs import free_port
from gmflow_jax.storage import workdir_path

ROOT = Path(__file__).resolve().parents[2]

# The tests' models: get_config('tiny') variants (see the config files).
TOY = "checkerboard_k64:tiny"  # a small MLP on 64K checkerboard points, ~100 steps/s on one core
DIT = "digits_gmdit:tiny"  # a one-block GM-DiT with SpectrumMLP on the 8×8 digits
TOY_FLAGS = ("--config.checkpoint.keep=10",)
DIT_FLAGS = ("--config.data.read=global",)


def child_env(devices: int = 1) -> dict[str, str]:
    """Environment of a trainer subprocess on ``devices`` simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_cmd(config: str, workdir: str | Path, data_dir: str | Path, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gmflow_jax.train",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *flags,
    ]


def run(
    cmd: Sequence[str], *, devices: int = 1, timeout: float = 300, file_size_limit: int | None = None
) -> subprocess.CompletedProcess:
    """Runs a command to completion; stdout+stderr captured as text in ``.stdout``. ``file_size_limit``
    (bytes): no file the child writes may grow past it (writes fail with "File too large")."""

    if file_size_limit:  # through the shell: a preexec_fn would fork this multithreaded (JAX) process
        cmd = ["bash", "-c", f'ulimit -f {file_size_limit // 1024} && exec "$@"', "bash", *cmd]
    return subprocess.run(
        list(cmd),
        env=child_env(devices),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The process exited with ``code``, printed no traceback, and its last line is its one error line."""
    assert result.returncode == code, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("gmflow_jax."), result.stdout[-3000:]
    return last


def start(cmd: Sequence[str], *, devices: int = 1, log: Path | None = None) -> subprocess.Popen:
    """Starts a command in the background, its output going to ``log`` (or discarded)."""
    out = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - closed by the child's exit
    return subprocess.Popen(list(cmd), env=child_env(devices), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def check_run(workdir: str, steps: list[int]) -> None:
    """The workdir holds ``steps``, each matching its manifest, and the run's config, samples and events."""
    root = workdir_path(workdir)
    directory = root / CHECKPOINT_DIR
    assert list_steps(directory) == steps
    assert all(verify_step(directory, s) is None for s in steps)
    assert read_meta(directory, steps[-1])["step"] == steps[-1]
    assert (root / "config.json").exists() and (root / "samples" / "latest.png").exists()
    assert any("tfevents" in p.name for p in (root / "tensorboard").iterdir())
    assert not (root / "trainer.lock").exists()


def checkpoint_steps(workdir: str | Path) -> list[int]:
    """Committed checkpoint steps in a workdir."""
    return list_steps(os.path.join(workdir, CHECKPOINT_DIR))


def wait_for(predicate, *, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.05) -> None:
    """Polls ``predicate()`` until true; fails on timeout or if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before the condition was met")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the condition")
        time.sleep(poll)


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)


def load_state(workdir: str | Path, step: int | None = None) -> dict:
    """The checkpointed train state of ``step`` (default: latest) as numpy arrays (no sharding needed)."""
    steps = checkpoint_steps(workdir)
    assert steps, f"no checkpoint in {workdir}"
    return restore(os.path.join(workdir, CHECKPOINT_DIR), steps[-1] if step is None else step)


def flat(tree) -> dict[str, np.ndarray]:
    """``{path: array}`` of a nested tree."""
    import jax

    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def two_processes(cmd_for, tmp_path: Path, tag: str, devices: int = 1, timeout: float = 400) -> list[str]:
    """Runs ``cmd_for(*distributed_flags)`` as 2 processes on loopback (gloo); asserts exit 0; returns their logs."""
    port = free_port()
    procs = [
        start(
            cmd_for(
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--distributed_timeout=120",
            ),
            devices=devices,
            log=tmp_path / f"{tag}{i}.log",
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + timeout
    try:  # stop early when one fails (the other would wait for it until the distributed timeout)
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    logs = [(tmp_path / f"{tag}{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return logs
