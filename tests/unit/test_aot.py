"""Ahead-of-time compiles for TPU topologies on the CPU (gmflow_jax.aot; libtpu is a test dependency)."""

from __future__ import annotations

import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from gmflow_jax import aot
from gmflow_jax.train.config import fsdp_rules, load_config
from gmflow_jax.utilization import CHIPS

TOPOLOGY = "v5p:2x2x1"  # 4 chips, one host


@pytest.fixture(scope="module")
def devices():
    return aot.topology_devices(TOPOLOGY)


def tiny(**kw):
    config = load_config("imagenet_gmdit_k8:tiny")
    config.update(kw)
    return config


@pytest.mark.parametrize(
    "name,expected",
    [
        ("v5p:4x4x4", "v5p:4x4x4"),
        ("v5p-64", "v5p:2x4x4"),  # 64 TensorCores = 32 chips
        ("v5p-8", "v5p:2x2x1"),
        ("v4-32", "v4:2x2x4"),
        ("v5litepod-256", "v5e:16x16"),  # v5e counts chips
        ("v5e-8", "v5e:2x4"),
        ("v6e-256", "v6e:16x16"),
    ],
)
def test_resolve_topology(name, expected):
    assert aot.resolve_topology(name) == expected


@pytest.mark.parametrize("name", ["v5p", "v5p-6", "h100-8", "v5p:4x4"])
def test_resolve_topology_refuses(name):
    with pytest.raises(ValueError, match="topology"):
        aot.resolve_topology(name)


def test_topology_devices(devices):
    assert len(devices) == 4
    assert aot.chip_for(devices[0].device_kind) is CHIPS["v5p"]
    v4 = aot.topology_devices("v4-32")  # one device per chip (megacore), as JAX runs a v4
    assert len(v4) == 16 and aot.chip_for(v4[0].device_kind) is CHIPS["v4"]


def state_bytes_per_device(config, devices) -> int:
    """Bytes of one device's shards of the train state, from the trainer's own abstract shardings."""
    from gmflow_jax.sharding import make_mesh
    from gmflow_jax.train.state import setup_state

    setup = setup_state(config, make_mesh(config.mesh, devices=devices))
    leaves = jax.tree.leaves(setup.abstract)
    return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in leaves)


def test_train_step_report(devices):
    replicated, fsdp = tiny(mesh=(-1, 1)), tiny(mesh=(1, -1), sharding=fsdp_rules())
    for config in (replicated, fsdp):
        r = aot.compile_train_step(config, devices)
        state = state_bytes_per_device(config, devices)
        assert r.fits and r.num_devices == 4 and r.batch_size == 8
        assert r.compiled.argument_bytes >= state  # the state's shards and the batch (TPU layouts pad)
        assert r.compiled.alias_bytes >= state  # the state is donated: the new one lives in its buffers
        assert r.compiled.flops >= r.model_flops_per_device > 0  # backward and optimizer on top of the model
        assert r.step_seconds_at(0.5) == pytest.approx(r.model_flops_per_device / (0.5 * 459e12))
        # the KR transport's eigh (and FSDP's ZeroCrop): custom calls the cost model sums as -1 s each
        assert "EighTpu" in r.compiled.unpriced
        assert r.compiled.optimal_seconds < 0 < r.compiled.estimated_seconds < 1e-3
        assert r.compiled.loops == 0 and r.predicted_seconds == (r.compiled.estimated_seconds,) * 2  # no range
        mfu = r.model_flops_per_device / (r.compiled.estimated_seconds * 459e12)
        assert r.predicted_mfu == pytest.approx((mfu, mfu))
    # FSDP splits the parameters and optimizer state over the devices
    assert state_bytes_per_device(fsdp, devices) < state_bytes_per_device(replicated, devices) / 2


def test_train_step_report_rejects_a_batch_that_does_not_split(devices):
    with pytest.raises(ValueError, match="batch_size=6"):
        aot.compile_train_step(tiny(mesh=(-1, 1), batch_size=6), devices)


def test_sampler_report(devices):
    config = tiny()
    guided = aot.compile_sampler(config, devices, batch_per_device=2, num_steps=4)
    assert guided.network_calls_per_step == 2.0  # conditional and unconditional in one batch
    assert guided.batch_size == 8 and guided.fits
    assert 0.0 < guided.solver_flop_share < 1.0
    plain = aot.compile_sampler(config, devices, batch_per_device=2, num_steps=4, guided=False)
    assert plain.network_calls_per_step == 1.0
    assert plain.compiled.flops < guided.compiled.flops
    # the step scan is a loop whose body XLA counts once: the predicted call is 4 of the counted steps
    assert guided.compiled.loops >= 1 and guided.counted_steps == 1 and guided.loop_factor == 4
    assert guided.predicted_seconds == pytest.approx(4 * guided.compiled.estimated_seconds)
    flops = 4 * 2 * guided.forward_flops_per_example * 8 / 4  # steps × evaluations × forward × batch / devices
    assert guided.predicted_mfu == pytest.approx(flops / (guided.predicted_seconds * 459e12))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gmflow_jax.aot", "--config=imagenet_gmdit_k8:tiny", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_report():
    result = run_cli(f"--topology={TOPOLOGY}", "--config.mesh=(1,-1)", "--sampler_batch_per_device=2")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "4 × TPU v5" in out
    for word in ("HBM total", "FLOP per device per step", "bracket: at 40 % / 60 % MFU", "GM solver share"):
        assert word in out, out
    assert "fits" in out and "DOES NOT FIT" not in out
    number = r"[\d.e-]+ ms {}, [\d,]+ images/s, MFU [\d.]+ % \(the TPU compiler's cost model"  # no loops: no range
    assert re.search(r"^  predicted: " + number.format("per step"), out, re.M), out
    assert re.search(r"^  predicted: " + number.format("per sampler call") + r": .* × 8 for all 8\)$", out, re.M), out


def test_cli_step_that_does_not_fit():
    # 2^22 images on 4 v5e chips (16 GiB each): the TPU compiler's own out-of-memory verdict
    result = run_cli("--topology=v5e:2x2", "--config.mesh=(-1,1)", "--config.batch_size=4194304", "--nosampler")
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gmflow_jax.aot: error: the train step does not fit"), result.stderr[-3000:]
    assert "GiB more than the" in last and "--config.model.remat_policy=full" in last
    assert "Traceback" not in result.stderr


def test_loops_are_counted(devices):
    # XLA's cost analysis counts a loop body once: the report says so when the program has loops
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    x = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=NamedSharding(Mesh(np.asarray(devices), ("d",)), P()))

    def power(n):
        return jax.jit(lambda a: jax.lax.fori_loop(0, n, lambda _, c: jnp.tanh(c @ a), a))

    one, eight = (aot.Compiled.of(power(n).lower(x).compile()) for n in (1, 8))
    assert one.loops == 0 and eight.loops >= 1
    assert eight.flops < 2 * one.flops  # the body's matmul counted once, not eight times


def one_device(devices):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    return NamedSharding(Mesh(np.asarray(devices[:1]), ("d",)), P())


def test_predicted_matmul_is_no_faster_than_peak(devices):
    import jax.numpy as jnp

    n = 4096
    x = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=one_device(devices))
    c = aot.Compiled.of(jax.jit(lambda a, b: a @ b).lower(x, x).compile())
    peak = 2 * n**3 / 459e12  # v5p bf16
    assert peak <= c.estimated_seconds < 2 * peak and c.unpriced == ()


def test_predicted_time_counts_every_loop_iteration(devices):
    # XLA's cost model counts a scan's body once; scaled by executed / counted FLOPs, a scan of N matmul
    # layers is priced as the same N layers unrolled (loop-free, so priced in full by the compiler)
    import jax.numpy as jnp

    n, layers = 1024, 4
    x = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=one_device(devices))
    w = jax.ShapeDtypeStruct((layers, n, n), jnp.bfloat16, sharding=one_device(devices))

    def scanned(x, w):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    def unrolled(x, w):
        for i in range(layers):
            x = jnp.tanh(x @ w[i])
        return x

    scan, flat = (aot.Compiled.of(jax.jit(f).lower(x, w).compile()) for f in (scanned, unrolled))
    assert scan.loops == 1 and flat.loops == 0
    assert scan.estimated_seconds < 0.5 * flat.estimated_seconds  # the body priced once
    # as a "train step" whose analytic model FLOPs are the N matmuls (1 device, batch 1): the FLOPs the count
    # misses priced at peak (fast) and at the counted program's rate (slow: the body's, as they are its copies)
    r = aot.StepReport(scan, 1, CHIPS["v5p"], 1, layers * 2 * n**3)
    assert r.uncounted_flops == pytest.approx((layers - 1) * 2 * n**3, rel=0.01)
    fast, slow = r.predicted_seconds
    assert fast == pytest.approx(scan.estimated_seconds + r.uncounted_flops / 459e12)
    assert fast < slow == pytest.approx(flat.estimated_seconds, rel=0.1)
    line = next(line for line in aot.step_report_lines(r) if "predicted" in line)
    assert re.match(r"  predicted: [\d.e-]+–[\d.e-]+ ms per step, [\d,]+–[\d,]+ images/s, MFU [\d.]+–[\d.]+ % ", line)


def test_unpriced_custom_calls_are_left_out(devices):
    # the cost model sums an eigh (a custom call it cannot price) as -1 s
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16, sharding=one_device(devices))
    m = jax.ShapeDtypeStruct((8, 4, 4), jnp.float32, sharding=one_device(devices))
    both = aot.Compiled.of(jax.jit(lambda m, x: (jnp.linalg.eigh(m)[0], x @ x)).lower(m, x).compile())
    matmul = aot.Compiled.of(jax.jit(lambda x: x @ x).lower(x).compile())
    assert both.unpriced == ("EighTpu",) and both.optimal_seconds < 0
    assert both.estimated_seconds == pytest.approx(matmul.estimated_seconds, rel=0.1)


def test_no_estimate_off_tpu():
    # a CPU compile has no 'optimal_seconds': the report says so instead of a number
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    c = aot.Compiled.of(jax.jit(lambda a: a @ a).lower(x).compile())
    assert c.optimal_seconds is None and c.estimated_seconds is None
    r = aot.StepReport(c, 1, CHIPS["v5p"], 8, 1e9)
    assert r.predicted_seconds is None and r.predicted_mfu is None
    lines = aot.step_report_lines(r)
    assert "  predicted: no estimate (the compiler's cost analysis has no 'optimal_seconds'" in "\n".join(lines)
    assert any(line.startswith("  bracket: at 40 % / 60 % MFU") for line in lines)
    sampler = aot.SamplerReport(c, c, 2.0, 1, CHIPS["v5p"], 8, num_steps=4, forward_flops_per_example=1e9)
    assert sampler.predicted_seconds is None
    assert aot.sampler_report_lines(sampler, "gm-ode")[-1].startswith("  predicted: no estimate (")


def test_grad_accumulation_is_one_loop_and_shrinks_the_activations(devices):
    # 4 micro-batches: one step's work in a loop whose body XLA counts once; the temporaries hold the
    # activations (here of a 128-wide block on 64 tokens) of a quarter of the batch, plus what does not
    # scale with it (gradient sums, the optimizer's work): 0.51 × measured; the same model FLOPs per step,
    # and the report names the micro-batches
    def config(k):
        c = tiny(mesh=(-1, 1), batch_size=256, grad_accum_steps=k)
        c.model.update(hidden_size=128, input_size=16, spectrum_base_size=(16, 16))
        return c

    one, four = (aot.compile_train_step(config(k), devices) for k in (1, 4))
    assert four.compiled.loops == one.compiled.loops + 1
    assert four.model_flops_per_device == one.model_flops_per_device
    assert four.compiled.flops < 0.5 * one.compiled.flops < four.uncounted_flops
    assert four.compiled.temp_bytes < 0.6 * one.compiled.temp_bytes
    lines = aot.step_report_lines(four)
    assert lines[0] == "train step, batch 256 (64 per device, 4 micro-batches of 16):"
    assert any("the micro-batch loop" in line for line in lines)


def test_distillation_step_compiles_teacher_and_student(devices):
    # a pi-Flow student config: the teacher (from distill.teacher_config, no workdir) is a sharded argument
    # of the step, and its forwards count in the model FLOPs
    student = load_config("digits_piflow:tiny")
    r = aot.compile_train_step(student, devices)
    plain = aot.compile_train_step(load_config("digits_gmdit:tiny"), devices)
    assert r.fits and r.compiled.argument_bytes > plain.compiled.argument_bytes  # + the teacher's weights
    assert r.model_flops_per_example > plain.model_flops_per_example
    student.distill.teacher_config = ""
    with pytest.raises(ValueError, match=r"^config\.distill\.nfe=1 makes a pi-Flow student, which trains against"):
        aot.compile_train_step(student, devices)  # no teacher at all: refused, never the GMFlow loss instead


def test_windowed_einsum_off_keeps_fsdp_matmuls_out_of_loops():
    # 8 chips, 2048 rows per chip: XLA turns FSDP's all-gather / reduce-scatter + matmul pairs into windowed-einsum
    # loops, which the cost model prices once; config.windowed_einsum=False (the ImageNet recipes') compiles the
    # trainer's step without them, and the CPU step ignores it
    from gmflow_jax.sharding import make_mesh
    from gmflow_jax.train.step import compiler_options

    devices = aot.topology_devices("v5p-16")

    def report(windowed):
        return aot.compile_train_step(
            tiny(mesh=(1, -1), sharding=fsdp_rules(), batch_size=1024, windowed_einsum=windowed), devices
        )

    on, off = report(True), report(False)
    assert on.compiled.loops > 0 and off.compiled.loops == 0
    assert off.predicted_seconds[0] == off.predicted_seconds[1]  # loop-free: priced in full, no range
    assert compiler_options(tiny(windowed_einsum=False), make_mesh((-1, 1))) is None  # a CPU mesh
