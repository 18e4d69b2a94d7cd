"""Ahead-of-time compiles for a TPU topology on any machine: does the step fit, and how fast can it be?

``compile_train_step(config, devices)`` lowers the trainer's own step (``train.step.jit_train_step``:
the same function, shardings and donation) from abstract shapes, for the devices of a
``jax.experimental.topologies`` description (libtpu compiles for TPUs on a CPU-only machine; no real
devices, no data), and reads XLA's per-device memory and FLOP figures. ``compile_sampler`` does
the same for the sampler's compiled function. ``python -m gmflow_jax.aot`` prints the report.

XLA's cost analysis counts a loop body once. The train step's FLOPs are the step's only when its
program has no loops (no FSDP collective-matmul loops: ``config.windowed_einsum = False``, the ImageNet
recipes' setting, keeps them out); otherwise the report says the figure is a lower bound. The sampler
scans over its steps, so its FLOPs are those of one solver step (plus the one-off noise draw), which is
what the solver's share is computed from.

The predicted times come from the TPU compiler's own cost model: libtpu's ``cost_analysis()`` has
``'optimal_seconds'``, its estimate of the program's run time (CPU and GPU compiles have none: the
report says so). Its sum counts each custom call it cannot price (e.g. the eigh of the KR transport)
as -1 s; those are added back, i.e. left out at 0 s, and named. It prices a loop body once too, so
the FLOPs its count misses are priced apart. The sampler's are whole solver steps like the one
counted: its estimate is scaled by steps run / steps counted. The train step's (with loops: FSDP's
collective matmuls; the analytic FLOPs it runs, the model's and 4/3 of them with remat, minus the
count) are matmul chunks of unknown speed: the prediction is a range, from pricing them at the
chip's peak to pricing them at the counted program's average rate (docs/benchmarks.md compares it
with a loop-free compile of the same per-chip work).
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

from gmflow_jax.aot.cost import GIB, Compiled
from gmflow_jax.models.factory import build_model, data_shape, remat_policy, split_params
from gmflow_jax.sampling import sample_fn
from gmflow_jax.sharding import make_mesh
from gmflow_jax.utilization import (
    Chip,
    chip_for,
    gmdit_forward_flops,
    recomputed_forward_share,
    train_flops_per_example,
)

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
class StepReport:
    """The train step compiled for ``num_devices`` devices of ``chip``."""

    compiled: Compiled
    num_devices: int
    chip: Chip | None
    batch_size: int
    model_flops_per_example: float | None  # analytic (utilization.py); None if not counted
    recompute_factor: float = 1.0  # executed / model FLOPs by remat: 4/3 with full remat (utilization.py)
    grad_accum_steps: int = 1  # micro-batches per step (a loop: XLA counts one micro-batch's FLOPs)

    @property
    def fits(self) -> bool:
        return self.compiled.fits_on(self.chip)

    @property
    def uncounted_flops(self) -> float | None:
        """FLOPs per device that XLA's count misses: 0 without loops; with loops the analytic FLOPs the step
        executes (the model's × ``recompute_factor``) minus the count (at least 0); None if not known."""
        if not self.compiled.loops:
            return 0.0
        if self.model_flops_per_device is None:
            return None
        return max(0.0, self.model_flops_per_device * self.recompute_factor - self.compiled.flops)

    @property
    def predicted_seconds(self) -> tuple[float, float] | None:
        """Step time (s) by the TPU compiler's cost model as (fast, slow): its estimate plus the uncounted FLOPs
        priced at the chip's peak, and at the counted program's average rate; one value twice without loops."""
        t, missing = self.compiled.estimated_seconds, self.uncounted_flops
        if t is None or missing is None or self.chip is None or not self.compiled.flops:
            return None
        return t + missing / (self.chip.peak_tflops * 1e12), t * (1 + missing / self.compiled.flops)

    @property
    def predicted_mfu(self) -> tuple[float, float] | None:
        """Model FLOPs over ``predicted_seconds`` (fast, slow) at the chip's bf16 peak (fractions)."""
        if self.predicted_seconds is None or self.model_flops_per_device is None:
            return None
        peak = self.chip.peak_tflops * 1e12
        fast, slow = self.predicted_seconds
        return self.model_flops_per_device / (fast * peak), self.model_flops_per_device / (slow * peak)

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
    num_steps: int = 1  # solver steps of one sampler call (network evaluations: × network_calls_per_step)
    forward_flops_per_example: float | None = None  # analytic network forward of one image (utilization.py)

    @property
    def counted_steps(self) -> int:
        """Solver steps in XLA's count: 1 when the step scan is a loop (its body counted once), more when XLA
        unrolled it; from the counted FLOPs over those of the network evaluations of one step."""
        per_step = self.network.flops * self.network_calls_per_step
        return max(1, round(self.compiled.flops / per_step)) if per_step else 1

    @property
    def loop_factor(self) -> float:
        """Executed / counted FLOPs of a sampler call: solver steps run over solver steps counted."""
        return self.num_steps / self.counted_steps

    @property
    def predicted_seconds(self) -> float | None:
        """Time (s) of one sampler call by the TPU compiler's cost model, scaled by ``loop_factor``; None off TPU."""
        if self.compiled.estimated_seconds is None:
            return None
        return self.compiled.estimated_seconds * self.loop_factor

    @property
    def predicted_mfu(self) -> float | None:
        """Analytic network FLOPs of a call (steps × evaluations × forward) over ``predicted_seconds`` at peak."""
        t = self.predicted_seconds
        if t is None or self.chip is None or self.forward_flops_per_example is None:
            return None
        flops = self.num_steps * self.network_calls_per_step * self.forward_flops_per_example * self.batch_size
        return flops / self.num_devices / (t * self.chip.peak_tflops * 1e12)

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
    from gmflow_jax.train.distill import flops_per_example, setup_teacher
    from gmflow_jax.train.loop import check_devices
    from gmflow_jax.train.state import setup_state
    from gmflow_jax.train.step import jit_train_step, step_arguments

    validate_config(config)
    mesh = make_mesh(config.mesh, devices=devices)
    check_devices(config, len(devices), len({d.process_index for d in devices}))
    setup = setup_state(config, mesh)
    teacher = setup_teacher(config, mesh, shapes_only=True)  # distillation: the frozen teacher is an argument
    lowered = jit_train_step(config, setup, mesh, teacher).lower(*step_arguments(config, setup, mesh, teacher))
    compiled = _compile(lowered, "train step", STEP_LEVERS)
    n, factor = int(config.batch_size), 1.0
    if config.model.kind == "gmdit":  # the recomputed share of the student's forward (1/3 of its training FLOPs)
        factor = 1.0 + recomputed_forward_share(config.model, remat_policy(config.model)) / 3.0
    flops = train_flops_per_example(config.model) if teacher is None else flops_per_example(config, teacher)
    return StepReport(Compiled.of(compiled), len(devices), _chip(devices), n, flops, factor, config.grad_accum_steps)


def _patch_embedding_rows(jaxpr: Any, kernel_shape: tuple[int, ...]) -> int:
    """Rows multiplied by the patch-embedding kernel in ``jaxpr`` (loop bodies once, the largest branch of a
    ``cond``, e.g. ``models.dense``'s per-platform products): each network evaluation does this product exactly
    once, over (batch · tokens) rows."""
    rows = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and tuple(eqn.invars[1].aval.shape) == kernel_shape:
            rows += int(np.prod(eqn.invars[0].aval.shape[:-1]))
        for value in eqn.params.values():
            branches = value if isinstance(value, tuple | list) else (value,)
            inner = [getattr(b, "jaxpr", b) for b in branches]
            rows += max((_patch_embedding_rows(j, kernel_shape) for j in inner if hasattr(j, "eqns")), default=0)
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
    forward = gmdit_forward_flops(config.model)
    return SamplerReport(
        Compiled.of(sampler), Compiled.of(network), calls, len(devices), _chip(devices), n, num_steps, forward
    )


# --- the report -------------------------------------------------------------------------


class DoesNotFit(ValueError):
    """The compiled step needs more device memory than the chip has."""


STEP_LEVERS = (
    "try --config.grad_accum_steps=K (the same batch in K micro-batches, activations about 1/K), "
    "--config.model.remat_policy=full (recompute blocks in the backward pass; 'minimal' keeps their matmuls' "
    "outputs), a smaller --config.batch_size "
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
    """The train step's report: memory against the chip, compiled and model FLOPs, the predicted time, the bracket."""
    per_device = r.batch_size // r.num_devices
    k = r.grad_accum_steps
    micro = f", {k} micro-batches of {per_device // k}" if k > 1 else ""
    lines = [f"train step, batch {r.batch_size} ({per_device} per device{micro}):", *_memory_lines(r.compiled, r.chip)]
    flop = f"  FLOP per device per step: compiled {r.compiled.flops:.3e}"
    if r.model_flops_per_device is not None:
        flop += (
            f"; model {r.model_flops_per_device:.3e} (analytic, {r.model_flops_per_example / 1e9:.1f} GFLOP per "
            f"example); compiled / model {r.compiled.flops / r.model_flops_per_device:.2f}"
        )
    lines.append(flop)
    if r.compiled.loops:
        kinds = "the micro-batch loop, " if r.grad_accum_steps > 1 else ""
        lines.append(
            f"  (the program has {r.compiled.loops} loops ({kinds}e.g. FSDP's all-gathers fused with matmuls) and XLA "
            "counts a loop body once: the compiled figure is a lower bound)"
        )
    note = ""
    if r.compiled.loops and r.compiled.estimated_seconds is not None:
        note = f"{_ms(r.compiled.estimated_seconds)} with loop bodies counted once, " + (
            "a lower bound"
            if r.uncounted_flops is None
            else f"+ the {r.uncounted_flops:.2e} FLOPs it misses, at peak (fast) or at its average rate (slow)"
        )
    lines.append(predicted_line(r.compiled, r.predicted_seconds, r.predicted_mfu, r.batch_size, "per step", note))
    if r.chip is not None and r.model_flops_per_device is not None:
        t40, t60 = r.step_seconds_at(0.4), r.step_seconds_at(0.6)
        lines.append(
            f"  bracket: at 40 % / 60 % MFU of {r.chip.peak_tflops:g} TFLOP/s (bf16 peak): {_ms(t40)} / {_ms(t60)} "
            f"per step, {r.batch_size / t40:,.0f} / {r.batch_size / t60:,.0f} images/s"
        )
    return lines


def sampler_report_lines(r: SamplerReport, description: str) -> list[str]:
    """The sampler's report: memory, FLOPs per solver step, the GM solver's share of them, the predicted time."""
    net = r.network.flops * r.network_calls_per_step
    note = ""
    if r.compiled.estimated_seconds is not None and r.loop_factor != 1:
        counted = f"{r.counted_steps} solver step{'s' if r.counted_steps > 1 else ''}"
        note = f"{_ms(r.compiled.estimated_seconds)} for the {counted} it counts, × {r.loop_factor:g}"
        note += f" for all {r.num_steps}"
    return [
        f"sampler {description}, batch {r.batch_size} ({r.batch_size // r.num_devices} per device):",
        *_memory_lines(r.compiled, r.chip),
        f"  FLOP per device per solver step: compiled {r.compiled.flops:.3e}; network "
        f"{r.network_calls_per_step:g} × {r.network.flops:.3e} = {net:.3e}; "
        f"GM solver share {100 * r.solver_flop_share:.2f} %",
        predicted_line(
            r.compiled, _twice(r.predicted_seconds), _twice(r.predicted_mfu), r.batch_size, "per sampler call", note
        ),
    ]


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms" if seconds >= 0.01 else f"{1e3 * seconds:.3g} ms"


NO_ESTIMATE = "no estimate (the compiler's cost analysis has no 'optimal_seconds': only TPU compiles have one)"


def _twice(x: float | None) -> tuple[float, float] | None:
    return None if x is None else (x, x)


def _span(lo: str, hi: str) -> str:
    return lo if lo == hi else f"{lo}–{hi}"


def predicted_line(
    c: Compiled,
    seconds: tuple[float, float] | None,
    mfu: tuple[float, float] | None,
    images: int,
    per: str,
    note: str,
) -> str:
    """``  predicted: <ms> <per>, <images/s>, MFU <%> (the TPU compiler's cost model[: note][; left out: ...])``,
    each number a range ``fast–slow`` where loops leave it open, or why there is no estimate."""
    if c.optimal_seconds is None:
        return f"  predicted: {NO_ESTIMATE}"
    if seconds is None:
        return (
            f"  predicted: no estimate (the TPU compiler's estimate, {c.optimal_seconds:.3g} s with {len(c.unpriced)} "
            "ops it cannot price, is not a time, or the chip or FLOPs are not known)"
        )
    fast, slow = seconds
    source = "the TPU compiler's cost model" + (f": {note}" if note else "")
    if c.unpriced:
        kinds = ", ".join(f"{t} × {c.unpriced.count(t)}" for t in sorted(set(c.unpriced)))
        source += f"; left out: {len(c.unpriced)} custom call(s) it cannot price: {kinds}"
    share = "MFU unknown (chip or model FLOPs not known)"
    if mfu is not None:
        share = f"MFU {_span(f'{100 * mfu[1]:.1f}', f'{100 * mfu[0]:.1f}')} %"
    time = _span(_ms(fast).removesuffix(" ms"), _ms(slow).removesuffix(" ms"))
    rate = _span(f"{images / slow:,.0f}", f"{images / fast:,.0f}")
    return f"  predicted: {time} ms {per}, {rate} images/s, {share} ({source})"


def check_fits(r: StepReport | SamplerReport, what: str, levers: str) -> None:
    """``DoesNotFit`` naming by how much ``what`` exceeds the chip's memory, and the levers to pull."""
    if r.fits:
        return
    cap = r.chip.memory_gib * GIB
    raise DoesNotFit(
        f"the {what} needs {_gib(r.compiled.total_bytes)} per device, {_gib(r.compiled.total_bytes - cap)} more than "
        f"the {r.chip.memory_gib:g} GiB of a {r.chip.name}; {levers}"
    )
