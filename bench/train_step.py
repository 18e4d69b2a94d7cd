"""Train step against the network forward, on one CPU core: time, XLA FLOPs, compile time, peak memory.

Cases: GM-DiT S/2 on 16×16×4 latents (patch 2, hidden 384, depth 12, 6 heads, K = 8, SpectrumMLP and
spectral loss, 1000 classes, AdamW + EMA, float32) at batch 8 and 32, and the digits config
(``configs/digits_gmdit.py``, batch 64). Each case runs in its own subprocess, pinned to one core
(``--cpu``) with one XLA thread, so that its peak resident memory is its own and the figures compare
with a one-thread reference. In that one process it measures

* the network forward as the samplers run it (no remat): ``net(x_t, tau, labels)``;
* the trainer's jitted, state-donating train step (loss, gradients, AdamW, EMA, metrics) on a fixed
  synthetic batch (the data pipeline is not measured);

each timed as the median of ``--steps`` calls after one warm-up call (CPU time of the process; wall time
in the JSON lines), plus compile times (CPU time), XLA's FLOP estimate (``compiled.cost_analysis()``)
of both and the step's temporaries (``compiled.memory_analysis()``: activations and workspace).
``--accum`` runs each case at every given ``config.grad_accum_steps`` (the same batch in that many
micro-batches). ``--profile`` adds where the step's time goes (``step_profile.py``: forward, backward and
update, matmuls against elementwise work, random draws), as shares of one traced process.
``--no-barrier`` replaces the residual-stream barrier (``models.gmdit.residual_barrier``) by the identity:
the network as it was before issue 12, whose backward pass XLA:CPU compiles quadratically in depth
(docs/performance.md).

    python bench/train_step.py                                 # all cases, markdown table
    python bench/train_step.py --cases s2_b32 --accum 1 2 4    # gradient accumulation: k micro-batches
    python bench/train_step.py --cases s2_b8 --no-barrier      # the step before issue 12, for comparison
    python bench/train_step.py --cases s2_b8 --profile         # and where its time goes

Run one invocation at a time: two at once on the two cores slow each other down by up to 25 %.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "s2_b8": ("GM-DiT S/2 16×16×4, K=8", 8),
    "s2_b32": ("GM-DiT S/2 16×16×4, K=8", 32),
    "digits": ("digits config (GM-DiT 8×8×1, K=8)", 64),
}
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def case_config(name: str, accum: int = 1):
    """The case's training config, with ``accum`` micro-batches per step."""
    from gmflow_jax.train.config import load_config

    c = load_config("digits_gmdit")
    if name.startswith("s2"):
        c.model.update(
            arch="",
            hidden_size=384,
            depth=12,
            num_heads=6,
            patch_size=2,
            input_size=16,
            in_channels=4,
            num_gaussians=8,
            num_classes=1000,
            logstd_inner_dim=1024,
            spectrum=True,
            spectrum_base_size=(16, 16),
        )
        c.loss.spectral_weight = 1.0
    c.batch_size = CASES[name][1]
    c.grad_accum_steps = accum
    return c


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    return float((ca[0] if isinstance(ca, list) else ca)["flops"])


def _median_time(fn, steps: int) -> tuple[float, float]:
    """Median (CPU seconds, wall seconds) of ``steps`` calls after a warm-up.

    CPU time is this process's (``time.process_time``): with one XLA thread it is the compute time,
    and unlike wall time it does not grow when other jobs take turns on the same core.
    """
    import jax

    jax.block_until_ready(fn())  # warm-up
    cpu, wall = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return sorted(cpu)[len(cpu) // 2], sorted(wall)[len(wall) // 2]


def run_case(name: str, steps: int, barrier: bool, accum: int = 1, profile: bool = False) -> dict:
    """Measures one case in this process; returns a JSON-able dict."""
    import jax
    import jax.numpy as jnp
    from common import synthetic_train_setup
    from flax import nnx
    from step_profile import profile_shares

    from gmflow_jax.models import gmdit
    from gmflow_jax.models.factory import build_model, split_params
    from gmflow_jax.train.memory import return_freed_memory
    from gmflow_jax.train.state import init_state
    from gmflow_jax.train.step import abstract_batch

    if not barrier:
        gmdit.residual_barrier = lambda x: x  # the network before issue 12
    config = case_config(name, accum)
    mesh, setup, step_fn, batch = synthetic_train_setup(config)

    # the network forward as sampling builds it: no remat
    graphdef, _ = split_params(nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0), remat=False)))
    n = int(config.batch_size)
    tau = jnp.full((n,), 500.0, jnp.float32)

    def forward(params, x, tau, labels):
        return nnx.merge(graphdef, params).net(x, tau, labels)

    # as the trainer does: compile from shapes, hand the compiler's freed memory back, then allocate the state
    shapes = abstract_batch(config, mesh)
    c0 = time.process_time()
    fwd = jax.jit(forward).lower(setup.abstract.params, shapes["image"], tau, shapes["label"]).compile()
    fwd_compile_s = time.process_time() - c0
    c0 = time.process_time()
    compiled = step_fn.lower(setup.abstract, shapes).compile()
    compile_s = time.process_time() - c0
    return_freed_memory()
    state = init_state(setup, 0)
    return_freed_memory()

    fwd_s, fwd_wall_s = _median_time(lambda: fwd(state.params, batch["image"], tau, batch["label"]), steps)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    step_s, step_wall_s = _median_time(one_step, steps)
    metrics = one_step()
    assert bool(jnp.isfinite(metrics["loss"]))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shares = profile_shares(compiled, one_step) if profile else {}
    return {
        "case": name,
        "barrier": barrier,
        "accum": accum,
        "temp_mb": compiled.memory_analysis().temp_size_in_bytes / 2**20,
        "params": setup.num_params(),
        "batch": n,
        "fwd_s": fwd_s,
        "step_s": step_s,
        "fwd_wall_s": fwd_wall_s,
        "step_wall_s": step_wall_s,
        "fwd_compile_s": fwd_compile_s,
        "compile_s": compile_s,
        "fwd_gflops": _flops(fwd) / 1e9,
        "step_gflops": _flops(compiled) / 1e9,
        "peak_rss_mb": peak_rss_mb,
        "profile": shares,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=None, help="timed calls per case (default 5 S/2, 20 digits)")
    parser.add_argument("--cpu", type=int, default=1, help="core each case is pinned to (-1: no pinning)")
    parser.add_argument("--no-barrier", action="store_true", help="the network before issue 12 (no residual barrier)")
    parser.add_argument("--accum", type=int, nargs="+", default=[1], help="micro-batches per step (each value a run)")
    parser.add_argument("--profile", action="store_true", help="add where the step's time goes (step_profile.py)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "bench"))
    if args.one:
        if args.cpu >= 0:
            os.sched_setaffinity(0, {args.cpu})
        from common import print_result

        steps = args.steps or (20 if args.one == "digits" else 5)
        print_result(run_case(args.one, steps, not args.no_barrier, args.accum[0], args.profile))
        return

    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD}".strip()
    from common import machine, run_case_subprocess, today

    rows = []
    for name in args.cases:
        for accum in args.accum:
            cmd = [__file__, "--one", name, "--cpu", str(args.cpu), "--accum", str(accum)]
            if args.steps:
                cmd += ["--steps", str(args.steps)]
            if args.no_barrier:
                cmd += ["--no-barrier"]
            if args.profile:
                cmd += ["--profile"]
            rows.append(run_case_subprocess(cmd, name))
            print(f"done {name} accum {accum}: {rows[-1]}", file=sys.stderr, flush=True)

    network = "without the residual barrier, as before issue 12" if args.no_barrier else "with the residual barrier"
    print(f"Train step vs network forward ({network}), {today()}, {machine()}, ")
    print(f"one core (--cpu {args.cpu}), one XLA thread\n")
    print(
        "| case | params | batch | micro-batches | forward (CPU ms) | train step (CPU ms) | step / forward | "
        "ms per image (step) | compile fwd / step (CPU s) | XLA GFLOP fwd / step | FLOP ratio | "
        "step temporaries (MB) | peak host RSS (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {CASES[r['case']][0]} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['accum']} | "
            f"{r['fwd_s'] * 1e3:.0f} | "
            f"{r['step_s'] * 1e3:.0f} | {r['step_s'] / r['fwd_s']:.2f} | {r['step_s'] / r['batch'] * 1e3:.1f} | "
            f"{r['fwd_compile_s']:.1f} / {r['compile_s']:.1f} | {r['fwd_gflops']:.1f} / {r['step_gflops']:.1f} | "
            f"{r['step_gflops'] / r['fwd_gflops']:.2f} | {r['temp_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    if args.profile:
        groups = sorted({k for r in rows for k in r["profile"] if k != "total_ms"})
        print("\nWhere the step's time goes (share of the traced op time; `--profile`, bench/step_profile.py):\n")
        print("| case | micro-batches | traced op ms per step | " + " | ".join(groups) + " |")
        print("|---|---:|---:|" + "---:|" * len(groups))
        for r in rows:
            cells = " | ".join(f"{100 * r['profile'].get(g, 0.0):.1f} %" for g in groups)
            print(f"| {CASES[r['case']][0]} | {r['accum']} | {r['profile']['total_ms']:.0f} | {cells} |")


if __name__ == "__main__":
    main()
