"""pi-Flow on the 2-D checkerboard, the authors' toy figure: the K = 64 teacher with many steps and with one,
against its 1-NFE student.

    python bench/piflow_checkerboard.py                                  # the configs' steps (~20 min on 2 cores)
    python bench/piflow_checkerboard.py --student_steps 1000             # docs/benchmarks.md's run (15 min)
    python bench/piflow_checkerboard.py --teacher_steps 3000 --student_steps 500   # shorter runs

1. The teacher (``configs/checkerboard_k64.py``, through ``bench/checkerboard.py``'s ``bench_config`` and
   ``train_model``: 10 000 steps × batch 1024, the cosine decay spanning ``--teacher_steps``) in
   ``--out``/teacher, then its 1-NFE student (``configs/checkerboard_piflow.py``: pi-ID from the teacher's
   weights, 2000 steps, ``--student_steps``) in ``--out``/student. A finished run is reused, a stopped one
   resumes (with the same step counts).
2. ``--samples`` points (default 100 000, the same starting noise for every row) from the teacher's EMA
   weights with GM-ODE 2 at ``--teacher_nfe`` (default 8) steps and at 1 step (``max(⌈128/NFE⌉, 2)``
   sub-steps a step, as ``bench/checkerboard.py``), and from the student's with its own policy at 1 NFE
   (``solver='piflow'``, 128 sub-steps); measured as ``bench/checkerboard.py`` does: the sliced
   Wasserstein-1 distance to fresh data points (disjoint from the training set; floor: two data draws), the
   fraction inside the white squares, and samples/s (the second, warm, call).

Results: a markdown table on stdout, ``--out``/metrics.json, and ``--picture`` (default
``docs/img/piflow_checkerboard.png``: 2-D histograms of the data, the teacher at NFE steps and at 1 step, the
student).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
from absl import logging
from checkerboard import bench_config, sliced_wasserstein, train_model
from common import machine, today

from gmflow_jax.data.builders import CHECKERBOARD_SIZE, checkerboard_inside, checkerboard_sample
from gmflow_jax.sampling import Sampler
from gmflow_jax.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def student_config(args: argparse.Namespace, teacher_dir: Path):
    """``checkerboard_piflow`` with the bench's step count, seed, data directory and teacher."""
    c = load_config("checkerboard_piflow")
    c.num_steps = args.student_steps
    c.seed = args.seed
    c.data.data_dir = args.data_dir
    c.distill.teacher = str(teacher_dir)
    c.log.sample_every_steps = 0
    c.log.progress_every_steps = 100
    return c


def warm(fn) -> tuple[np.ndarray, float, float]:
    """``fn()`` twice: (samples, first call's seconds with the compile, the warm call's seconds)."""
    t0 = time.perf_counter()
    np.asarray(fn())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = np.asarray(fn())
    return x, first, time.perf_counter() - t0


def save_picture(panels: dict[str, np.ndarray], path: Path) -> None:
    """One log-density histogram (``gmflow_jax.viz.render``) per panel, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gmflow_jax.viz import render

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5))
    for ax, (title, pts) in zip(axes, panels.items(), strict=True):
        ax.imshow(render(pts[np.all(np.isfinite(pts), axis=-1)], 1), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout(pad=0.4)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "piflow_checkerboard")
    parser.add_argument("--teacher_steps", type=int, default=10_000)
    parser.add_argument("--student_steps", type=int, default=2000)
    parser.add_argument("--teacher_nfe", type=int, default=8, help="the teacher's many-step row")
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default="", help="dataset directory ('': the trainer's default)")
    parser.add_argument("--picture", type=Path, default=ROOT / "docs" / "img" / "piflow_checkerboard.png")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    logging.set_verbosity(logging.INFO)
    t_start = time.perf_counter()

    teacher_dir, student_dir = args.out / "teacher", args.out / "student"
    tconfig = bench_config(None, {}, argparse.Namespace(steps=args.teacher_steps, **vars(args)))
    sconfig = student_config(args, teacher_dir)
    training = {"teacher": train_model("teacher", tconfig, teacher_dir)}
    training["student"] = train_model("student", sconfig, student_dir)

    n = args.samples
    rng = np.random.default_rng(args.seed)
    checkerboard_sample(rng, CHECKERBOARD_SIZE)  # the dataset's points (seed 0): skip them
    reference = checkerboard_sample(rng, n)
    data = checkerboard_sample(rng, n)
    noise = np.random.default_rng(args.seed + 1).standard_normal((n, 2)).astype(np.float32)
    teacher, student = Sampler.from_checkpoint(str(teacher_dir)), Sampler.from_checkpoint(str(student_dir))
    for s, c in ((teacher, tconfig), (student, sconfig)):
        if s.step != c.num_steps:
            raise SystemExit(f"{s.path}: the newest good checkpoint is step {s.step}, not {c.num_steps}.")

    def gm_ode(nfe: int):
        substeps = max(math.ceil(128 / nfe), 2)
        kw = dict(solver="gm-ode", order=2, num_steps=nfe, num_substeps=substeps, noise=noise, batch_size=n)
        return lambda: teacher.sample(args.seed + 2, **kw)

    def student_fn():
        return student.sample(args.seed + 2, solver="piflow", noise=noise, batch_size=n)

    rows = {  # label -> (sampler, network forwards / sample)
        f"teacher, GM-ODE 2, {args.teacher_nfe} steps": (gm_ode(args.teacher_nfe), args.teacher_nfe),
        "teacher, GM-ODE 2, 1 step": (gm_ode(1), 1),
        "student, pi-Flow, 1 NFE": (
            lambda: student.sample(args.seed + 2, solver="piflow", noise=noise, batch_size=n),
            1,
        ),
    }
    results = [dict(sampler="data (another draw)", forwards=0, sliced_w1=sliced_wasserstein(data, reference))]
    results[0]["inside"] = float(np.mean(checkerboard_inside(data)))
    panels = {"data": data}
    for label, (fn, forwards) in rows.items():
        pts, first, seconds = warm(fn)
        finite = np.all(np.isfinite(pts), axis=-1)
        row = dict(
            sampler=label,
            forwards=forwards,
            sliced_w1=sliced_wasserstein(np.where(finite[:, None], pts, 0.0), reference),
            inside=float(np.mean(checkerboard_inside(pts[finite]))) * float(finite.mean()),
            nonfinite=int((~finite).sum()),
            first_s=first,
            seconds=seconds,
            samples_per_s=n / seconds,
        )
        results.append(row)
        panels[label.replace(", GM-ODE 2", "").replace(", pi-Flow", "")] = pts
        print(f"{label}: SW1 {row['sliced_w1']:.4f} inside {row['inside']:.4f} ({seconds:.2f} s, {first:.1f} s cold)")

    metrics = dict(
        teacher_steps=args.teacher_steps,
        student_steps=args.student_steps,
        samples=n,
        results=results,
        training=training,
        total_seconds=time.perf_counter() - t_start,
        machine=machine(),
        date=today(),
    )
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    save_picture(panels, args.picture)

    print(f"\npi-Flow on the checkerboard, {metrics['date']}, {metrics['machine']}; {n} samples a row\n")
    print("| sampler | network forwards / sample | SW1 to data | inside | samples/s (warm) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        rate = f"{r['samples_per_s']:,.0f}" if "samples_per_s" in r else "—"
        print(f"| {r['sampler']} | {r['forwards']} | {r['sliced_w1']:.4f} | {r['inside']:.4f} | {rate} |")
    for name, t in training.items():
        done = t["steps"] - t["start_step"]
        print(
            f"\n{name}: {t['steps']} steps ({done} this run in {t['seconds']:.0f} s); final loss {t['final_loss']:.4f}"
        )
    print(f"\ntotal {metrics['total_seconds']:.0f} s; wrote {args.out}/metrics.json and {args.picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
