"""The CPU train step with ``models.dense.dot_general`` against autodiff's Dense backward, in one process.

    python bench/dense_ab.py                   # S/2 batch 8 (bench/train_step.py's s2_b8), 16 pairs
    python bench/dense_ab.py --case s2_b32 --pairs 8

Both steps are compiled in one process pinned to one core with one XLA thread: "autodiff" builds every
GM-DiT Dense with ``jax.lax.dot_general`` (the network before ``models.dense``), "dense" as the library
does. After one call each they take turns (the order swapped every pair), each call timed in CPU time;
the ratio is the median of the per-pair ratios dense / autodiff. The first step's loss and gradient
norm are printed for both: the same to float32 round-off.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from train_step import ONE_THREAD  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="s2_b8", choices=["s2_b8", "s2_b32", "digits"])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--cpu", type=int, default=1, help="core to pin to (-1: no pinning)")
    args = parser.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD}".strip()

    import jax
    import numpy as np
    from common import machine, synthetic_train_setup, today
    from train_step import case_config

    from gmflow_jax.models import dense
    from gmflow_jax.train.state import init_state
    from gmflow_jax.train.step import abstract_batch

    library = dense.dot_general
    steps = {}
    for name, product in (("autodiff", jax.lax.dot_general), ("dense", library)):
        dense.dot_general = product  # read by models.gmdit when it builds each Dense
        config = case_config(args.case, 1)
        mesh, setup, step_fn, batch = synthetic_train_setup(config)
        compiled = step_fn.lower(setup.abstract, abstract_batch(config, mesh)).compile()
        holder = {"state": init_state(setup, 0)}

        def step(compiled=compiled, holder=holder, batch=batch):
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics

        metrics = jax.device_get(step())
        print(f"{name}: first step loss {float(metrics['loss']):.7g}, grad norm {float(metrics['grad_norm']):.7g}")
        steps[name] = step
    dense.dot_general = library

    times = {name: [] for name in steps}
    for i in range(args.pairs):
        for name in list(steps) if i % 2 == 0 else list(steps)[::-1]:
            t0 = time.process_time()
            jax.block_until_ready(steps[name]())
            times[name].append(time.process_time() - t0)
    ratios = [b / a for a, b in zip(times["autodiff"], times["dense"], strict=True)]
    print(f"\n{args.case}, {today()}, {machine()}, one core (--cpu {args.cpu}), one XLA thread, {args.pairs} pairs\n")
    print("| step | median CPU ms | dense / autodiff (median of pairs) | pairs min–max |")
    print("|---|---:|---:|---|")
    for name, ts in times.items():
        ratio = f"{np.median(ratios):.3f} | {min(ratios):.2f}–{max(ratios):.2f}" if name == "dense" else "1 | "
        print(f"| {name} | {1e3 * np.median(ts):.0f} | {ratio} |")


if __name__ == "__main__":
    main()
