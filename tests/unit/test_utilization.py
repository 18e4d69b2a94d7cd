"""Model FLOPs and MFU (gmflow_jax.utilization).

The analytic GM-DiT count is checked against an independent one: every matrix product
(``dot_general``) in the traced forward pass of the real model, 2·(contracted size)·(output size).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gmflow_jax.models.factory import build_model, data_shape
from gmflow_jax.train.config import load_config
from gmflow_jax.utilization import CHIPS, ThroughputMeter, chip_for, gmdit_forward_flops, train_flops_per_example


def traced_matmul_flops(jaxpr) -> int:
    """2·K·(output elements) summed over the dot_generals of a jaxpr and its sub-jaxprs (of a ``cond``, the
    largest branch: ``models.dense`` gives each Dense product a CPU branch and a default one)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract_lhs, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod([lhs[i] for i in contract_lhs])) * int(np.prod(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            branches = [getattr(b, "jaxpr", b) for b in (value if isinstance(value, tuple | list) else (value,))]
            total += max((traced_matmul_flops(j) for j in branches if hasattr(j, "eqns")), default=0)
    return total


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("imagenet_gmdit_k8", {}),  # XL/2 on 32×32×4 latents, K = 8
        ("digits_gmdit", {}),
        ("digits_gmdit", dict(arch="", hidden_size=48, depth=3, num_heads=3, patch_size=2, mlp_ratio=2.0)),
        ("imagenet_gmdit_k8", dict(arch="S/4", input_size=24, num_gaussians=3, logstd_inner_dim=40)),
    ],
)
def test_gmdit_forward_flops_count_every_matmul(name, overrides):
    config = load_config(name)
    config.model.update(remat=False, **overrides)
    model = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    n = 3

    def forward(state, x, tau, labels):
        return nnx.merge(graphdef, state).net(x, tau, labels).means

    jaxpr = jax.make_jaxpr(forward)(
        state,
        jax.ShapeDtypeStruct((n, *data_shape(config.model)), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    assert gmdit_forward_flops(config.model) * n == traced_matmul_flops(jaxpr.jaxpr)
    assert train_flops_per_example(config.model) == 3 * gmdit_forward_flops(config.model)


def test_dit_xl2_forward_matches_the_published_figure():
    # DiT-XL/2 at 256²: 118.6 GFLOPs in the DiT paper, counting a multiply-add as one operation. The GM
    # head (K = 8) and the log-std head add < 0.1 %.
    config = load_config("imagenet_gmdit_k8")
    assert gmdit_forward_flops(config.model) / 2 / 1e9 == pytest.approx(118.6, rel=2e-3)


def test_toy_models_are_not_counted():
    assert train_flops_per_example(load_config("checkerboard_k64").model) is None


@pytest.mark.parametrize(
    "kind,chip",
    [
        ("TPU v4", "v4"),
        ("TPU v5 lite", "v5e"),
        ("TPU v5", "v5p"),
        ("TPU v6 lite", "v6e"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
    ],
)
def test_chip_for_device_kinds(kind, chip):
    assert chip_for(kind) is CHIPS[chip]


def test_unknown_devices_have_no_peak():
    assert chip_for("cpu") is None
    assert chip_for("TPU v7x") is None


def test_throughput_meter():
    chip = CHIPS["v5p"]
    meter = ThroughputMeter(flops_per_example=7e11, batch_size=4096, num_devices=32, chip=chip)
    assert meter.update(100, 1000.0) is None  # the first interval holds the compilation
    values = meter.update(200, 1050.0)  # 100 steps of 4096 images in 50 s
    assert values["perf/images_per_sec"] == pytest.approx(8192.0)
    assert values["perf/tflops_per_device"] == pytest.approx(7e11 * 8192 / 32 / 1e12)
    assert values["perf/mfu"] == pytest.approx(7e11 * 8192 / 32 / 459e12)
    unknown = ThroughputMeter(flops_per_example=None, batch_size=8, num_devices=1, chip=None)
    unknown.update(0, 0.0)
    assert unknown.update(10, 2.0) == {"perf/images_per_sec": 40.0}
