"""Train-step benchmark on this machine: compile time, images/s and peak host memory.

Cases: the digits config (``configs/digits_gmdit.py``) and a GM-DiT B/2 on 32×32×4 inputs
(K = 8, SpectrumMLP, 1000 classes, float32). Each case runs in its own subprocess so that its peak
resident memory (``resource.getrusage``) is its own. Batches are synthetic device arrays (the data
pipeline is not measured); the step is the trainer's jitted, state-donating train step.

    python bench/train_speed.py                       # both cases, markdown table
    python bench/train_speed.py --cases digits --steps 50
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "digits": "digits config (GM-DiT 8×8×1, K=8)",
    "b2_32": "GM-DiT B/2, 32×32×4, K=8",
}
DEFAULT_BATCH = {"digits": 64, "b2_32": 4}


def case_config(name: str, batch: int):
    from gmflow_jax.train.config import load_config

    c = load_config("digits_gmdit")
    if name == "b2_32":
        c.model.arch = "B/2"
        c.model.input_size = 32
        c.model.in_channels = 4
        c.model.num_classes = 1000
        c.model.logstd_inner_dim = 1024
        c.model.spectrum_base_size = (32, 32)
    c.batch_size = batch
    return c


def run_case(name: str, batch: int, steps: int) -> dict:
    """Measures one case in this process; returns a JSON-able dict."""
    import jax
    import jax.numpy as jnp
    from common import synthetic_train_setup

    from gmflow_jax.train.state import init_state

    config = case_config(name, batch)
    _, setup, step_fn, batch_arrays = synthetic_train_setup(config)
    state = init_state(setup, 0)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, batch_arrays)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch_arrays)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / steps
    assert bool(jnp.isfinite(metrics["loss"]))
    return {
        "case": name,
        "params": setup.num_params(),
        "batch": batch,
        "compile_s": compile_s,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20 digits, 2 B/2)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 64 digits, 4 B/2)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "bench"))
    from common import machine, print_result, run_case_subprocess, today

    if args.one:
        batch = args.batch or DEFAULT_BATCH[args.one]
        steps = args.steps or (20 if args.one == "digits" else 2)
        print_result(run_case(args.one, batch, steps))
        return

    rows = []
    for name in args.cases:
        cmd = [__file__, "--one", name]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        rows.append(run_case_subprocess(cmd, name))

    print(f"Train step, {today()}, {machine()}\n")
    print("| case | params | batch | compile (s) | step (s) | images/s | peak host RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {CASES[r['case']]} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['compile_s']:.1f} | "
            f"{r['step_s']:.3f} | {r['images_per_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
