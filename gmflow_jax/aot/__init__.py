"""Ahead-of-time compiles for a TPU topology on any machine: does the step fit, and how fast can it be?

``compile_train_step(config, devices)`` lowers the trainer's own step (``train.step.jit_train_step``:
the same function, shardings and donation) from abstract shapes, for the devices of a
``jax.experimental.topologies`` description (libtpu compiles for TPUs on a CPU-only machine; no real
devices, no data), and reads XLA's per-device memory and FLOP figures. ``compile_sampler`` does
the same for the sampler's compiled function. ``python -m gmflow_jax.aot`` prints the report.

XLA's cost analysis counts a loop body once. The train step's FLOPs are the step's only when its
program has no loops (no FSDP collective-matmul loops);
otherwise the report says the figure is a lower bound. The sampler scans over its steps, so its
FLOPs are those of one solver step (plus the one-off noise draw), which is what the solver's share
is computed from.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gmflow_jax.models.factory import build_model, data_shape, split_params
from gmflow_jax.sampling import sample_fn
from gmflow_jax.sharding import make_mesh
from gmflow_jax.utilization import Chip, chip_for, train_flops_per_example

GIB = 2.0**30

# Chips of a slice -> the topology of the standard slice shape (v4/v5p: 3-D tori; v5e/v6e: 2-D).
_3D_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"}
_2D_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def resolve_topology(name: str) -> str:
    """A topology name for ``jax.experimental.topologies``: ``'v5p:4x4x4'`` as it is, or an accelerator
    type: ``'v5p-64'`` / ``'v4-32'`` (the number counts TensorCores, 2 per chip), ``'v5litepod-256'`` /
    ``'v5e-256'`` / ``'v6e-256'`` (the number counts chips) -> ``'v5p:2x4x4'``, ..."""
    if re.fullmatch(r"v(4|5p):\d+x\d+x\d+|v(5e|6e):\d+x\d+", name):  # 3-D tori (v4, v5p), 2-D (v5e, v6e)
        return name
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if m is None:
        raise ValueError(
            f"--topology must look like 'v5p:4x4x4' (a topology) or 'v5p-64' (an accelerator type); got {name!r}."
        )
    family, count = m.group(1).replace("v5litepod", "v5e"), int(m.group(2))
    chips, shapes = (count // 2, _3D_SHAPES) if family in ("v4", "v5p") else (count, _2D_SHAPES)
    if chips not in shapes:
        raise ValueError(
            f"no standard slice shape known for {name!r} ({chips} chips); pass a topology like 'v5p:4x4x4'."
        )
    return f"{family}:{shapes[chips]}"


def topology_devices(topology: str) -> list[Any]:
    """The devices of a TPU topology (``'v5p:4x4x4'`` or ``'v5p-64'``), for compiling only."""
    name = resolve_topology(topology)
    # Off a TPU VM libtpu cannot query the host's metadata and prints a page of warnings; these two
    # variables answer its questions. They do not change the compiled program (the topology does).
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", name.split(":")[0] + "-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compiling holds no TPU: several compiles (or tests) may run at once without libtpu's lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    # JAX runs v4 in megacore mode (one device per chip, as on a real v4 VM); libtpu's default lists cores
    extra = {"chip_config_name": "megacore"} if name.startswith("v4:") else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **extra).devices)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Per-device figures of one compiled function (bytes and FLOPs as XLA counts them)."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs living in donated arguments' buffers
    temp_bytes: int
    code_bytes: int
    flops: float
    loops: int  # while loops in the program: XLA counts each body's FLOPs once

    @classmethod
    def of(cls, compiled: Any) -> Compiled:
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return cls(
            argument_bytes=int(mem.argument_size_in_bytes),
            output_bytes=int(mem.output_size_in_bytes),
            alias_bytes=int(mem.alias_size_in_bytes),
            temp_bytes=int(mem.temp_size_in_bytes),
            code_bytes=int(mem.generated_code_size_in_bytes),
            flops=float(cost.get("flops", 0.0)),
            loops=len(re.findall(r"\swhile\(", compiled.as_text())),
        )

    @property
    def total_bytes(self) -> int:
        """Peak device memory the program needs: arguments + outputs not aliased to them + temporaries + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    def fits_on(self, chip: Chip | None) -> bool:
        """Whether ``total_bytes`` fits in the chip's memory (unknown chips: not checked, True)."""
        return chip is None or self.total_bytes <= chip.memory_gib * GIB


@dataclasses.dataclass(frozen=True)
class StepReport:
    """The train step compiled for ``num_devices`` devices of ``chip``."""

    compiled: Compiled
    num_devices: int
    chip: Chip | None
    batch_size: int
    model_flops_per_example: float | None  # analytic (utilization.py); None if not counted

    @property
    def fits(self) -> bool:
        return self.compiled.fits_on(self.chip)

    @property
    def model_flops_per_device(self) -> float | None:
        if self.model_flops_per_example is None:
            return None
        return self.model_flops_per_example * self.batch_size / self.num_devices

    def step_seconds_at(self, mfu: float) -> float | None:
        """Step time if the chip ran the model FLOPs at ``mfu`` of its peak."""
        if self.chip is None or self.model_flops_per_device is None:
            return None
        return self.model_flops_per_device / (mfu * self.chip.peak_tflops * 1e12)


@dataclasses.dataclass(frozen=True)
class SamplerReport:
    """The sampler compiled for ``num_devices`` devices; FLOPs per solver step (see the module docstring)."""

    compiled: Compiled
    network: Compiled  # one network evaluation at the sampler's batch
    network_calls_per_step: float  # in units of one evaluation at the sampler's batch
    num_devices: int
    chip: Chip | None
    batch_size: int

    @property
    def solver_flop_share(self) -> float:
        """Share of a solver step's FLOPs spent outside the network (the GM solver's overhead)."""
        net = self.network.flops * self.network_calls_per_step
        return max(0.0, 1.0 - net / self.compiled.flops) if self.compiled.flops else float("nan")

    @property
    def fits(self) -> bool:
        return self.compiled.fits_on(self.chip)


def _chip(devices: Sequence[Any]) -> Chip | None:
    return chip_for(devices[0].device_kind)


def compile_train_step(config: Any, devices: Sequence[Any]) -> StepReport:
    """Compiles the trainer's step for ``devices`` from abstract shapes; ``ValueError`` for a bad config."""
    from gmflow_jax.train.config import validate_config
    from gmflow_jax.train.loop import check_devices
    from gmflow_jax.train.state import setup_state
    from gmflow_jax.train.step import abstract_batch, jit_train_step

    validate_config(config)
    mesh = make_mesh(config.mesh, devices=devices)
    check_devices(config, len(devices), len({d.process_index for d in devices}))
    setup = setup_state(config, mesh)
    batch = abstract_batch(config, mesh)
    compiled = _compile(jit_train_step(config, setup, mesh).lower(setup.abstract, batch), "train step", STEP_LEVERS)
    n = int(config.batch_size)
    return StepReport(Compiled.of(compiled), len(devices), _chip(devices), n, train_flops_per_example(config.model))


def _patch_embedding_rows(jaxpr: Any, kernel_shape: tuple[int, ...]) -> int:
    """Rows multiplied by the patch-embedding kernel in ``jaxpr`` (loop bodies once): each network
    evaluation does this product exactly once, over (batch · tokens) rows."""
    rows = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and tuple(eqn.invars[1].aval.shape) == kernel_shape:
            rows += int(np.prod(eqn.invars[0].aval.shape[:-1]))
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                rows += _patch_embedding_rows(inner, kernel_shape)
    return rows


def compile_sampler(
    config: Any,
    devices: Sequence[Any],
    *,
    batch_per_device: int = 256,
    solver: str = "gm-ode",
    order: int = 2,
    num_steps: int = 8,
    guided: bool = True,
) -> SamplerReport:
    """Compiles the sampler's function (``sampling.sample_fn``: the batch split over ``devices``, the
    weights replicated, as ``Sampler`` does) and one network evaluation at the same batch."""
    if config.model.kind != "gmdit":
        raise ValueError(
            f"the sampler report is for image models (config.model.kind='gmdit'); got {config.model.kind!r}."
        )
    mesh = Mesh(np.asarray(devices), ("data",))
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    abstract_model = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0), remat=False))
    graphdef, abs_params = split_params(abstract_model)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), nnx.to_pure_dict(abs_params))
    n = batch_per_device * len(devices)
    shape = data_shape(config.model)

    run = sample_fn(graphdef, shape, int(config.model.num_classes), (solver, order, num_steps, 1, guided, False, False))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    ints = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=split)
    args = (params, key, key, ints, ints, scalar, scalar, scalar)
    sampler = _compile(jax.jit(run).lower(*args), "sampler", SAMPLER_LEVERS)

    def forward(params, x, tau, labels):
        return nnx.merge(graphdef, params).net(x, tau, labels).means

    x = jax.ShapeDtypeStruct((n, *shape), jnp.float32, sharding=split)
    tau = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=split)
    network = jax.jit(forward).lower(params, x, tau, ints).compile()

    kernel = tuple(params["net"]["patch_embed"]["kernel"].shape)
    tokens = shape[0] * shape[1] // (kernel[0] // shape[2])  # the kernel is (patch² · C, D)
    calls = _patch_embedding_rows(jax.make_jaxpr(run)(*args).jaxpr, kernel) / (n * tokens)
    return SamplerReport(Compiled.of(sampler), Compiled.of(network), calls, len(devices), _chip(devices), n)


# --- the report -------------------------------------------------------------------------


class DoesNotFit(ValueError):
    """The compiled step needs more device memory than the chip has."""


STEP_LEVERS = (
    "try --config.model.remat=True (recompute blocks in the backward pass), a smaller --config.batch_size "
    "(or more devices), or shard the parameters and optimizer state over more devices (--config.mesh='(1,-1)' "
    "with the FSDP rules of configs/imagenet_gmdit_k8.py)."
)
SAMPLER_LEVERS = "try a smaller --sampler_batch_per_device."


def _compile(lowered: Any, what: str, levers: str) -> Any:
    """``lowered.compile()``; the TPU compiler's out-of-memory error becomes ``DoesNotFit`` naming the shortfall."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        m = re.search(r"required for ([\w ]+?) \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
        if m is None:
            raise DoesNotFit(f"the {what} does not fit: {str(e).splitlines()[0]}; {levers}") from e
        need, have = float(m.group(2)), float(m.group(3))
        raise DoesNotFit(
            f"the {what} does not fit: its {m.group(1)} alone need {need:.2f} GiB per device, "
            f"{need - have:.2f} GiB more than the {have:.2f} GiB of HBM available; {levers}"
        ) from e


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _memory_lines(c: Compiled, chip: Chip | None) -> list[str]:
    lines = [
        f"  HBM per device: arguments {_gib(c.argument_bytes)}, outputs {_gib(c.output_bytes)} "
        f"({_gib(c.alias_bytes)} of them in donated arguments), temporaries {_gib(c.temp_bytes)}, "
        f"code {_gib(c.code_bytes)}"
    ]
    if chip is None:
        lines.append(f"  HBM total {_gib(c.total_bytes)} per device (unknown chip: capacity not checked)")
    else:
        cap = chip.memory_gib * GIB
        verdict = "fits" if c.total_bytes <= cap else f"DOES NOT FIT by {_gib(c.total_bytes - cap)}"
        lines.append(
            f"  HBM total {_gib(c.total_bytes)} of {chip.memory_gib:g} GiB per device "
            f"({100 * c.total_bytes / cap:.0f} %): {verdict}"
        )
    return lines


def step_report_lines(r: StepReport) -> list[str]:
    """The train step's report: memory against the chip, compiled and model FLOPs, the MFU projections."""
    per_device = r.batch_size // r.num_devices
    lines = [f"train step, batch {r.batch_size} ({per_device} per device):", *_memory_lines(r.compiled, r.chip)]
    flop = f"  FLOP per device per step: compiled {r.compiled.flops:.3e}"
    if r.model_flops_per_device is not None:
        flop += (
            f"; model {r.model_flops_per_device:.3e} (analytic, {r.model_flops_per_example / 1e9:.1f} GFLOP per "
            f"example); compiled / model {r.compiled.flops / r.model_flops_per_device:.2f}"
        )
    lines.append(flop)
    if r.compiled.loops:
        lines.append(
            f"  (the program has {r.compiled.loops} loops, e.g. FSDP's all-gathers fused with matmuls, and XLA counts "
            "a loop body once: the compiled figure is a lower bound)"
        )
    if r.chip is not None and r.model_flops_per_device is not None:
        at = []
        for mfu in (0.4, 0.6):
            seconds = r.step_seconds_at(mfu)
            at.append(f"MFU {100 * mfu:.0f} %: {seconds:.3f} s per step, {r.batch_size / seconds:,.0f} images/s")
        lines.append(f"  at {r.chip.peak_tflops:g} TFLOP/s peak (bf16): " + "; ".join(at))
    return lines


def sampler_report_lines(r: SamplerReport, description: str) -> list[str]:
    """The sampler's report: memory, FLOPs per solver step, the GM solver's share of them."""
    net = r.network.flops * r.network_calls_per_step
    return [
        f"sampler {description}, batch {r.batch_size} ({r.batch_size // r.num_devices} per device):",
        *_memory_lines(r.compiled, r.chip),
        f"  FLOP per device per solver step: compiled {r.compiled.flops:.3e}; network "
        f"{r.network_calls_per_step:g} × {r.network.flops:.3e} = {net:.3e}; "
        f"GM solver share {100 * r.solver_flop_share:.2f} %",
    ]


def check_fits(r: StepReport | SamplerReport, what: str, levers: str) -> None:
    """``DoesNotFit`` naming by how much ``what`` exceeds the chip's memory, and the levers to pull."""
    if r.fits:
        return
    cap = r.chip.memory_gib * GIB
    raise DoesNotFit(
        f"the {what} needs {_gib(r.compiled.total_bytes)} per device, {_gib(r.compiled.total_bytes - cap)} more than "
        f"the {r.chip.memory_gib:g} GiB of a {r.chip.name}; {levers}"
    )
