"""Precision/recall benchmark: wall time of ``gmflow_jax.evaluate.metrics.precision_recall`` on random features.

The ADM setting is 50,000 reference × 50,000 sample InceptionV3 pool3 features (D = 2048, k = 3, blocks of
10,000). The cost is quadratic in N: three N×N squared-distance passes (real radii, fake radii, cross membership),
about 3·2·N²·D flops. If the measured 10K × 10K time extrapolates (×(N/10K)²) to more than ``--max-seconds``, the
full size is not run and the table reports the extrapolation.

    python bench/pr_speed.py                    # 10K probe, then 50K if it fits in --max-seconds
    python bench/pr_speed.py --max-seconds 0    # probe only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine, today  # noqa: E402

from gmflow_jax.evaluate.metrics import precision_recall  # noqa: E402


def run(n: int, dim: int, batch_size: int, k: int) -> tuple[float, float, float]:
    rng = np.random.default_rng(0)
    real = rng.random((n, dim), dtype=np.float32)
    fake = rng.random((n, dim), dtype=np.float32)  # same distribution, independent draws
    t0 = time.perf_counter()
    p, r = precision_recall(real, fake, k=k, batch_size=batch_size)
    return time.perf_counter() - t0, p, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--probe-n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=600.0)
    a = ap.parse_args()

    rows = []
    t, p, r = run(a.probe_n, a.dim, a.batch_size, a.k)
    gflops = 3 * 2 * a.probe_n**2 * a.dim / t / 1e9
    rows.append((f"{a.probe_n:,} × {a.probe_n:,}", "measured", t, gflops, f"{p:.4f} / {r:.4f}"))
    est = t * (a.n / a.probe_n) ** 2
    if a.n != a.probe_n:
        if est <= a.max_seconds:
            t_full, p, r = run(a.n, a.dim, a.batch_size, a.k)
            gflops = 3 * 2 * a.n**2 * a.dim / t_full / 1e9
            rows.append((f"{a.n:,} × {a.n:,}", "measured", t_full, gflops, f"{p:.4f} / {r:.4f}"))
        else:
            rows.append((f"{a.n:,} × {a.n:,}", f"extrapolated ×{(a.n / a.probe_n) ** 2:.0f} (N²)", est, gflops, "–"))

    print(f"precision_recall, D = {a.dim}, k = {a.k}, batch_size = {a.batch_size}, float32 ‖a‖²−2ab+‖b‖² blocks")
    print(f"machine: {machine()}; date: {today()}; times include jit compilation\n")
    print("| real × fake | how | wall time (s) | GFLOP/s (3·2·N²·D) | precision / recall |")
    print("|---|---|---|---|---|")
    for size, how, secs, gf, pr in rows:
        print(f"| {size} | {how} | {secs:.1f} | {gf:.0f} | {pr} |")


if __name__ == "__main__":
    main()
