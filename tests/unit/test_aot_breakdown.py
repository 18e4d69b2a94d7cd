"""The train step's parts compiled one by one (gmflow_jax.aot.breakdown) for a TPU topology, on the CPU."""

from __future__ import annotations

import pytest

from gmflow_jax import aot
from gmflow_jax.aot import breakdown
from gmflow_jax.train.config import load_config


@pytest.fixture(scope="module")
def devices():
    return aot.topology_devices("v5p:2x2x1")


def _check(parts, step, names):
    assert [p.name for p in parts] == names
    for p in parts:
        assert p.seconds is not None and p.seconds > 0, p.name
    forward, forward_backward = parts[0], parts[1]
    assert not forward.in_sum and forward.compiled.flops < forward_backward.compiled.flops
    # the backward of a matmul is two matmuls: the VJP program does about 3× the forward's FLOPs
    assert 2.5 < forward_backward.compiled.flops / forward.compiled.flops < 4.0
    lines = breakdown.breakdown_lines(parts, step)
    assert lines[0].startswith("breakdown") and lines[-1].lstrip().startswith("sum of the parts")
    assert all("% of the step" in line for line in lines[1:-1])
    total = sum(p.seconds for p in parts if p.in_sum)
    assert f"{100 * (total / step.predicted_seconds[0] - 1):+.1f} %" in lines[-1]


def test_gmflow_parts(devices):
    config = load_config("imagenet_gmdit_k8:tiny")
    parts = breakdown.compile_parts(config, devices)
    step = aot.compile_train_step(config, devices)
    names = [
        "network forward",
        "network forward + backward",
        "draws (t, transition pair, label dropout)",
        "GM loss + its gradient",
        "optimizer + EMA update",
    ]
    _check(parts, step, names)


def test_distillation_parts(devices):
    config = load_config("digits_piflow:tiny")
    parts = breakdown.compile_parts(config, devices)
    step = aot.compile_train_step(config, devices)
    names = [
        "student forward",
        "student forward + backward",
        "segment draws",
        "teacher forward (one intermediate state)",
        "policy rollouts + pi-ID loss + its gradient",
        "optimizer + EMA update",
    ]
    _check(parts, step, names)
    assert parts[3].count == config.distill.num_intermediate_states
