"""Ahead-of-time fit table: the ImageNet recipe's train step and the sampler compiled for TPU slices.

    python bench/aot_fit.py [--cases v5p-64,v5p-8,v4-32,v5e-256] [--sampler]
    python bench/aot_fit.py --cases v4-32 --set batch_size=2048 --set grad_accum_steps=2   # any config field

Each case compiles in its own process (libtpu on this CPU; no TPU needed) and prints one RESULT
line; the script prints a markdown table for docs/benchmarks.md. The batch of a case is the
recipe's 4096, or 128 per chip on slices with fewer than the 32 chips of a v5p-64. "Predicted" is the
TPU compiler's own estimate of the step (``cost_analysis()['optimal_seconds']``, corrected for loops
as ``gmflow_jax.aot`` does); the 40 / 60 % MFU columns are a bracket, not a prediction.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, print_result, run_case_subprocess, today  # noqa: E402

RECIPE_BATCH, PER_CHIP = 4096, 128
CASES = ("v5p-64", "v5p-8", "v4-32", "v5e-256")


def run_case(topology: str, with_sampler: bool, overrides: list[str]) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from gmflow_jax import aot
    from gmflow_jax.train.config import load_config

    devices = aot.topology_devices(topology)
    config = load_config("imagenet_gmdit_k8")
    config.batch_size = min(RECIPE_BATCH, PER_CHIP * len(devices))
    for item in overrides:  # field=value, Python literals
        field, value = item.split("=", 1)
        node = config
        *parents, leaf = field.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value if isinstance(node[leaf], str) else ast.literal_eval(value)
    result = dict(topology=aot.resolve_topology(topology), chips=len(devices), batch=config.batch_size)
    from gmflow_jax.models.factory import remat_policy

    result.update(remat=remat_policy(config.model), mesh=list(config.mesh), chip=devices[0].device_kind)
    result.update(accum=config.grad_accum_steps)
    t0 = time.time()
    try:
        step = aot.compile_train_step(config, devices)
    except aot.DoesNotFit as e:
        print_result(dict(result, fits=False, error=str(e).split(";")[0], compile_s=time.time() - t0))
        return
    result.update(
        fits=step.fits,
        compile_s=time.time() - t0,
        hbm_gib=step.compiled.total_bytes / aot.GIB,
        hbm_cap_gib=step.chip.memory_gib,
        flops=step.compiled.flops,
        loops=step.compiled.loops,
        model_flops=step.model_flops_per_device,
        step_s_40=step.step_seconds_at(0.4),
        step_s_60=step.step_seconds_at(0.6),
        optimal_s=step.compiled.optimal_seconds,
        unpriced=list(step.compiled.unpriced),
        temp_gib=step.compiled.temp_bytes / aot.GIB,
        step_s_pred=step.predicted_seconds,  # (fast, slow): equal without loops
        mfu_pred=step.predicted_mfu,
    )
    if with_sampler:
        t0 = time.time()
        s = aot.compile_sampler(config, devices)
        result.update(
            sampler_hbm_gib=s.compiled.total_bytes / aot.GIB,
            sampler_share=s.solver_flop_share,
            sampler_batch=s.batch_size,
            sampler_s_pred=s.predicted_seconds,
            sampler_mfu_pred=s.predicted_mfu,
            sampler_compile_s=time.time() - t0,
        )
    print_result(result)


def row(r: dict) -> str:
    mesh = f"({r['mesh'][0]}, {r['mesh'][1]})"
    head = (
        f"| {r['topology']} ({r['chips']} chips) | {r['batch']} ({r['batch'] // r['chips']}) | {r.get('accum', 1)} "
        f"| {mesh} | {r['remat']} "
    )
    if not r["fits"]:
        return head + f"| does not fit: {r.get('error', '')} | | | | | {r['compile_s']:.0f} |"
    images = [r["batch"] / r[k] for k in ("step_s_40", "step_s_60")]
    pred = "no estimate"
    if r.get("step_s_pred"):
        (fast, slow), (mfu_fast, mfu_slow) = r["step_s_pred"], r["mfu_pred"]
        pred = (
            f"{fast:.3f} s, {r['batch'] / fast:,.0f} images/s, {100 * mfu_fast:.1f} %"
            if fast == slow
            else f"{fast:.3f}–{slow:.3f} s, {r['batch'] / slow:,.0f}–{r['batch'] / fast:,.0f} images/s, "
            f"{100 * mfu_slow:.1f}–{100 * mfu_fast:.1f} %"
        )
    return (
        head + f"| {r['hbm_gib']:.1f} / {r['hbm_cap_gib']:g} | {r['flops'] / r['model_flops']:.2f} | {pred} "
        f"| {r['step_s_40']:.3f} / {r['step_s_60']:.3f} | {images[0]:,.0f} / {images[1]:,.0f} | {r['compile_s']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--sampler", action="store_true", help="also compile the sampler (GM-ODE 2, 8 guided steps)")
    parser.add_argument("--set", action="append", default=[], help="config override field=value (Python literal)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(args.case, args.sampler, args.set)
        return
    results = []
    for case in args.cases.split(","):
        extra = (["--sampler"] if args.sampler else []) + [f"--set={s}" for s in args.set]
        results.append(run_case_subprocess([__file__, f"--case={case}", *extra], case))
        print(results[-1], flush=True)
    print(f"\nMachine: {machine()}; {today()}\n")
    print(
        "| slice | batch (per chip) | micro-batches | mesh | remat | HBM GiB per chip (used / chip) "
        "| compiled / model FLOPs "
        "| predicted: step, images/s, MFU | step s at 40 / 60 % MFU | images/s at 40 / 60 % MFU | compile s |"
    )
    print("|---|---|---:|---|---|---|---:|---|---|---|---:|")
    for r in results:
        print(row(r))
    if args.sampler:
        print(
            "\n| slice | sampler batch | HBM GiB per chip | GM solver share of a step's FLOPs "
            "| predicted: call, images/s, MFU | compile s |"
        )
        print("|---|---:|---:|---:|---|---:|")
        for r in results:
            if "sampler_share" in r:
                pred = "no estimate"
                if r.get("sampler_s_pred"):
                    t = r["sampler_s_pred"]
                    pred = (
                        f"{1e3 * t:.0f} ms, {r['sampler_batch'] / t:,.0f} images/s, {100 * r['sampler_mfu_pred']:.1f} %"
                    )
                print(
                    f"| {r['topology']} | {r['sampler_batch']} | {r['sampler_hbm_gib']:.1f} "
                    f"| {100 * r['sampler_share']:.2f} % | {pred} | {r['sampler_compile_s']:.0f} |"
                )


if __name__ == "__main__":
    main()
