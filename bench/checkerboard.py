"""The 2-D checkerboard experiment (paper §5.1): GMFlow (K = 64) vs a flow-matching baseline.

Trains both models on the same budget, samples every (method, NFE) pair and reports the
sliced Wasserstein-1 distance to fresh data and the fraction of samples inside the white
squares. Writes ``metrics.json``, ``samples.npz`` and ``grid.png`` into ``--out``.

    python bench/checkerboard.py                     # the full run (about 25 min on 2 CPU cores)
    python bench/checkerboard.py --preset demo       # the small version behind `make demo`
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import machine, today
from flax import nnx

from gmflow_jax import solvers
from gmflow_jax.data.builders import checkerboard_inside, checkerboard_sample
from gmflow_jax.models.toy import ToyGMFlow
from gmflow_jax.toy_train import train_toy

PRESETS = {
    "full": dict(steps=10000, batch=1024, hidden=256, samples=100_000, nfes=(1, 2, 4, 8, 16, 32)),
    "demo": dict(steps=3000, batch=1024, hidden=128, samples=20_000, nfes=(1, 2, 4, 8)),
}
GM_METHODS = {  # label -> (solver, order)
    "GM-SDE": ("gm-sde", 1),
    "GM-SDE 2": ("gm-sde", 2),
    "GM-ODE 2": ("gm-ode", 2),
}
BASELINE_METHODS = {"Euler": "euler", "DDPM": "ddpm", "DPM++ 2M": "dpmpp-2m"}


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_directions: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 between equal-size point sets (N, 2), averaged over random directions."""
    angles = np.random.default_rng(seed).uniform(0.0, math.pi, num_directions)
    dirs = np.stack([np.cos(angles), np.sin(angles)], axis=0)  # (2, D)
    pa, pb = np.sort(a @ dirs, axis=0), np.sort(b @ dirs, axis=0)
    return float(np.mean(np.abs(pa - pb)))


def run_method(model, solver: str, order: int, nfe: int, noise: jax.Array, key: jax.Array) -> tuple[np.ndarray, float]:
    """Samples with one configuration; returns the samples and the sampling seconds (after compile)."""
    substeps = max(math.ceil(128 / nfe), 2) if solver == "gm-ode" else 1
    fn = jax.jit(
        lambda n, k: solvers.sample(model, n, key=k, solver=solver, order=order, num_steps=nfe, num_substeps=substeps)
    )
    fn(noise[:8], key).block_until_ready()  # compile on a small batch (shape-specialised, but warms caches)
    start = time.perf_counter()
    out = np.asarray(fn(noise, key).block_until_ready())
    return out, time.perf_counter() - start


def plot_grid(samples: dict[str, dict[int, np.ndarray]], nfes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(samples)
    fig, axes = plt.subplots(len(methods), len(nfes), figsize=(1.6 * len(nfes), 1.6 * len(methods)), squeeze=False)
    for r, method in enumerate(methods):
        for c, nfe in enumerate(nfes):
            ax = axes[r, c]
            pts = samples[method][nfe]
            ax.hist2d(pts[:, 0], pts[:, 1], bins=160, range=[[-5, 5], [-5, 5]], cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"NFE {nfe}", fontsize=9)
            if c == 0:
                ax.set_ylabel(method, fontsize=9)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)  # ~4x smaller


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--out", type=Path, default=Path("results/checkerboard"))
    parser.add_argument("--steps", type=int, help="training steps per model (overrides the preset)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    if args.steps:
        cfg["steps"] = args.steps
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()

    train_data = checkerboard_sample(rng, 1 << 20)
    models, histories, train_seconds = {}, {}, {}
    for name, k, objective in (("gmflow", 64, "gm"), ("baseline", 1, "l2")):
        model = ToyGMFlow(num_components=k, hidden=cfg["hidden"], learn_std=objective == "gm", rngs=nnx.Rngs(args.seed))
        t0 = time.perf_counter()
        models[name], histories[name] = train_toy(
            model, train_data, objective=objective, steps=cfg["steps"], batch_size=cfg["batch"], seed=args.seed
        )
        train_seconds[name] = time.perf_counter() - t0

    n = cfg["samples"]
    reference = checkerboard_sample(rng, n)
    floor = sliced_wasserstein(checkerboard_sample(rng, n), reference)
    noise = jax.random.normal(jax.random.PRNGKey(args.seed + 1), (n, 2), jnp.float32)
    key = jax.random.PRNGKey(args.seed + 2)
    methods = {label: ("gmflow", solver, order) for label, (solver, order) in GM_METHODS.items()}
    methods.update({label: ("baseline", solver, 1) for label, solver in BASELINE_METHODS.items()})

    samples, rows = {}, []
    for label, (model_name, solver, order) in methods.items():
        samples[label] = {}
        for nfe in cfg["nfes"]:
            pts, seconds = run_method(models[model_name], solver, order, nfe, noise, key)
            finite = np.all(np.isfinite(pts), axis=-1)
            row = dict(
                method=label,
                nfe=nfe,
                sliced_w1=sliced_wasserstein(np.where(finite[:, None], pts, 0.0), reference),
                inside=float(np.mean(checkerboard_inside(pts[finite]))) * float(finite.mean()),
                nonfinite=int((~finite).sum()),
                seconds=seconds,
            )
            rows.append(row)
            samples[label][nfe] = pts
            print(f"{label:>9} NFE {nfe:>2}: SW1 {row['sliced_w1']:.4f}  inside {row['inside']:.4f}  ({seconds:.1f}s)")

    metrics = dict(
        preset=args.preset,
        config=cfg,
        data_noise_floor_sliced_w1=floor,
        results=rows,
        train_seconds=train_seconds,
        final_train_loss={k: v[-1] for k, v in histories.items()},
        total_seconds=time.perf_counter() - t_start,
        machine=machine(),
        date=today(),
    )
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    np.savez_compressed(
        args.out / "samples.npz", **{f"{m}|{nfe}": pts for m, per in samples.items() for nfe, pts in per.items()}
    )
    plot_grid(samples, cfg["nfes"], args.out / "grid.png")
    print(f"data noise floor SW1 {floor:.4f}; wrote {args.out}/metrics.json, samples.npz, grid.png")
    print(f"total {metrics['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
