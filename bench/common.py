"""Shared helpers of the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import jax

from gmflow_jax.cli import keep_cpu_reductions_in_xla

keep_cpu_reductions_in_xla()  # the XLA:CPU setting of the project's commands (docs/performance.md §8)


def machine() -> str:
    """CPU model, core count and JAX devices, for the benchmark record."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}"
    )


def today() -> str:
    return time.strftime("%Y-%m-%d")


def print_result(result: dict) -> None:
    """What a case's subprocess prints for ``run_case_subprocess`` to read."""
    print("RESULT " + json.dumps(result), flush=True)


def run_case_subprocess(cmd: list[str], name: str, env: dict[str, str] | None = None) -> dict:
    """Runs one benchmark case in its own process (its peak RSS is its own) and returns its RESULT dict.

    ``env``: environment variables set for it on top of this process's.
    """
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), **(env or {})}
    out = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise SystemExit(f"case {name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(line[len("RESULT ") :])


def synthetic_train_setup(config):
    """``(mesh, setup, step_fn, batch)`` for timing the trainer's step (``jit_train_step``) on a random
    batch of ``config.batch_size`` examples split over all local devices (``train.step.abstract_batch``)."""
    from gmflow_jax.sharding import make_mesh
    from gmflow_jax.train.state import setup_state
    from gmflow_jax.train.step import abstract_batch, jit_train_step

    mesh = make_mesh((-1, 1))
    setup = setup_state(config, mesh)
    shapes = abstract_batch(config, mesh)
    key = jax.random.PRNGKey(1)
    batch = {
        "image": jax.device_put(jax.random.normal(key, shapes["image"].shape), shapes["image"].sharding),
        "label": jax.device_put(
            jax.random.randint(key, shapes["label"].shape, 0, config.model.num_classes), shapes["label"].sharding
        ),
    }
    return mesh, setup, jit_train_step(config, setup, mesh), batch
