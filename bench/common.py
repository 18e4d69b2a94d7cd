"""Shared helpers of the benchmark scripts."""

from __future__ import annotations

import os
import platform
import time

import jax


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
