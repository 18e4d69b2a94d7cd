"""Model FLOPs and hardware utilisation (MFU): the analytic cost of a GM-DiT, and chip peaks.

MFU = model FLOP/s per device ÷ the device's peak dense bf16 FLOP/s. *Model* FLOPs are the
matrix products the method needs, counted analytically (2 FLOPs per multiply-add): a training
step is 3× the forward (backward = 2× forward); rematerialisation is *not* counted, so remat
lowers MFU, as it should. Element-wise work (norms, the GM loss) is left out: it is a few
percent of a DiT's FLOPs and runs on the vector units.

GM-DiT forward FLOPs per image (T = (H/p)(W/p) tokens, width D, depth L, MLP width M = r·D,
K Gaussians, C channels):

* per token: ``2·T·(P·D + L·(4·D² + 2·D·M) + D·p²·K·(C+1))``: patch embedding (P = p²·C inputs),
  the attention projections and MLP of every block, the GM head;
* attention: ``4·L·T²·D`` (scores Q·Kᵀ and the weighted sum of V);
* per image: ``2·(256·D + D² + L·6·D² + 2·D² + D·I + I)``: the time MLP, the adaLN modulations,
  the final modulation and the log-std head (inner width I); the SpectrumMLP is negligible.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gmflow_jax.models.gmdit import DIT_SIZES, TIME_FREQ_DIM


@dataclasses.dataclass(frozen=True)
class Chip:
    """Peak dense bf16 TFLOP/s and memory (GiB) of one JAX device of a kind."""

    name: str
    peak_tflops: float
    memory_gib: float


# Vendor figures, per JAX device (one TPU chip with megacore, or one GPU), dense bf16.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275.0, 32.0),
    "v5e": Chip("TPU v5e", 197.0, 16.0),
    "v5p": Chip("TPU v5p", 459.0, 95.0),
    "v6e": Chip("TPU v6e", 918.0, 32.0),
    "a100": Chip("NVIDIA A100", 312.0, 80.0),
    "h100": Chip("NVIDIA H100 SXM", 989.0, 80.0),
    "h100-pcie": Chip("NVIDIA H100 PCIe", 756.0, 80.0),
    "h200": Chip("NVIDIA H200", 989.0, 141.0),
}

# jax Device.device_kind (lower case) -> CHIPS key. GPUs are matched by substring below.
_TPU_KINDS = {
    "tpu v4": "v4",
    "tpu v5 lite": "v5e",
    "tpu v5e": "v5e",
    "tpu v5": "v5p",
    "tpu v5p": "v5p",
    "tpu v6 lite": "v6e",
    "tpu v6e": "v6e",
}


def chip_for(device_kind: str) -> Chip | None:
    """The ``Chip`` of a ``jax.Device.device_kind`` ('TPU v5 lite', 'NVIDIA H100 80GB HBM3', ...), or None."""
    kind = device_kind.lower().strip()
    if kind in _TPU_KINDS:
        return CHIPS[_TPU_KINDS[kind]]
    if "h200" in kind:
        return CHIPS["h200"]
    if "h100" in kind:
        return CHIPS["h100-pcie" if "pcie" in kind else "h100"]
    if "a100" in kind:
        return CHIPS["a100"]
    return None


def _trunk(mcfg: Any) -> tuple[int, int, int]:
    """(width D, depth L, patch size p) of the GM-DiT of ``config.model``."""
    if mcfg.arch:
        d, depth, _ = DIT_SIZES[mcfg.arch.split("/")[0]]
        return d, depth, int(mcfg.arch.split("/")[1])
    return int(mcfg.hidden_size), int(mcfg.depth), int(mcfg.patch_size)


def gmdit_forward_flops(mcfg: Any) -> float:
    """Analytic forward FLOPs of one image through the GM-DiT of ``config.model`` (module docstring)."""
    d, depth, p = _trunk(mcfg)
    h, w = (mcfg.input_size, mcfg.input_size) if isinstance(mcfg.input_size, int) else tuple(mcfg.input_size)
    c, k, m, inner = int(mcfg.in_channels), int(mcfg.num_gaussians), int(mcfg.mlp_ratio * d), int(mcfg.logstd_inner_dim)
    tokens = (h // p) * (w // p)
    per_token = p * p * c * d + depth * (4 * d * d + 2 * d * m) + d * p * p * k * (c + 1)
    attention = 4 * depth * tokens * tokens * d
    per_image = TIME_FREQ_DIM * d + d * d + depth * 6 * d * d + 2 * d * d + d * inner + inner
    return float(2 * tokens * per_token + attention + 2 * per_image)


# remat policy (gmdit.REMAT_POLICIES) -> the block's matrix products its backward pass recomputes
_RECOMPUTED: dict[str, tuple[str, ...]] = {
    "none": (),
    "full": ("qkv", "out", "mlp_in", "mlp_out", "scores", "context"),
    "save_qkv_proj": ("out", "mlp_in", "mlp_out", "scores", "context"),
    "save_dot_except_mlp": ("mlp_in", "mlp_out", "scores", "context"),
    "minimal": ("scores", "context"),
    "minimal_with_context": ("scores",),
    "matmul_without_batch": ("scores", "context"),
}


def recomputed_forward_share(mcfg: Any, policy: str) -> float:
    """Share of a GM-DiT forward's FLOPs that the backward pass recomputes under a remat ``policy``: 1 for 'full'
    (the whole forward, as this module has always counted it), 0 for 'none', the products a policy does
    not keep for the others (per token and block: q, k, v 6·D², out 2·D², MLP 2·D·M each, scores and
    context 2·T·D each); ``ValueError`` for an unknown policy."""
    if policy not in _RECOMPUTED:
        raise ValueError(f"remat policy must be one of {tuple(_RECOMPUTED)}; got {policy!r}.")
    if policy == "full":
        return 1.0
    d, depth, p = _trunk(mcfg)
    h, w = (mcfg.input_size, mcfg.input_size) if isinstance(mcfg.input_size, int) else tuple(mcfg.input_size)
    tokens, m = (h // p) * (w // p), int(mcfg.mlp_ratio * d)
    cost = {"qkv": 6 * d * d, "out": 2 * d * d, "mlp_in": 2 * d * m, "mlp_out": 2 * d * m}
    cost.update(scores=2 * tokens * d, context=2 * tokens * d)
    recomputed = depth * tokens * sum(cost[name] for name in _RECOMPUTED[policy])
    return float(recomputed) / gmdit_forward_flops(mcfg)


def train_flops_per_example(mcfg: Any) -> float | None:
    """Model FLOPs of one training example (3× the forward), or None for models not counted (toy MLPs)."""
    if mcfg.kind != "gmdit":
        return None
    return 3.0 * gmdit_forward_flops(mcfg)


def utilization(flops_per_example: float | None, examples_per_sec: float, num_devices: int, chip: Chip | None) -> dict:
    """``{'examples_per_sec', 'tflops_per_device'?, 'mfu'?}`` for a measured throughput."""
    out = {"examples_per_sec": examples_per_sec}
    if flops_per_example is not None:
        tflops = flops_per_example * examples_per_sec / num_devices / 1e12
        out["tflops_per_device"] = tflops
        if chip is not None:
            out["mfu"] = tflops / chip.peak_tflops
    return out


class ThroughputMeter:
    """Training throughput between log points: ``update(step, now)`` returns ``{'perf/images_per_sec',
    'perf/tflops_per_device'?, 'perf/mfu'?}`` over the steps since the previous call (None on the first
    call, whose interval holds the compilation)."""

    def __init__(self, flops_per_example: float | None, batch_size: int, num_devices: int, chip: Chip | None):
        self.flops_per_example, self.batch_size = flops_per_example, batch_size
        self.num_devices, self.chip = num_devices, chip
        self._last: tuple[int, float] | None = None

    def update(self, step: int, now: float) -> dict[str, float] | None:
        last, self._last = self._last, (step, now)
        if last is None or step <= last[0] or now <= last[1]:
            return None
        rate = (step - last[0]) * self.batch_size / (now - last[1])
        values = utilization(self.flops_per_example, rate, self.num_devices, self.chip)
        return {f"perf/{'images_per_sec' if k == 'examples_per_sec' else k}": v for k, v in values.items()}
