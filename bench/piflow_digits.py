"""pi-Flow students of the ``make demo`` teacher (issue 21): quality against the teacher, and the cost of a step.

    python bench/piflow_digits.py                                   # teacher results/digits_demo, students in
                                                                    # results/piflow_digits/nfe{1,2}
    python bench/piflow_digits.py --student_steps 1000 --more_steps 3000   # also the 1-NFE student at 3000 steps
    python bench/piflow_digits.py --skip_cost                       # quality only
    python bench/piflow_digits.py --cost_only --cost_set distill.total_substeps=32   # the step's cost alone

1. The teacher: ``--teacher DIR`` (default ``results/digits_demo``, the ``make demo`` workdir); without a
   checkpoint there, ``digits_gmdit`` is trained there first (2000 steps of batch 64). The 1-NFE
   (``digits_piflow``) and 2-NFE (``digits_piflow:2``) students are trained by ``python -m gmflow_jax.train``
   into ``--out``/nfe1 and nfe2 for ``--student_steps`` (default the config's 1000: a distillation step
   takes ~0.23 s on 2 CPU cores, and the whole bench ~11 minutes); a run that already reached its steps
   is reused, one that stopped short resumes. ``--more_steps S``: the 1-NFE student is then trained on to
   step S and measured again.
2. Quality: 100 samples per class (1000, the same labels and starting noise for every row), measured with
   the demo's functions (``gmflow_jax.demo``): classifier accuracy on the intended class, within-class pixel
   std, Fréchet distance (pixels) to the real digits and to the teacher's own 8-step samples, warm samples/s
   on this CPU. Rows: the teacher (GM-ODE 2, probabilistic guidance w̃ = 0.3) at 8 steps, at 8 steps from
   other noise (the Fréchet distances' noise floor), at 2 and 1 steps; the students. The issue's targets are
   printed as pass/fail lines.
3. Cost: the median CPU time (``time.process_time``) of the trainer's jitted, state-donating step on one
   random batch of 64: a distillation step of the 1-NFE student (teacher loaded from its checkpoint) against
   a teacher training step, alternated in one process (``--cost_only``: this alone, for ``--cost_config``
   with ``--cost_set`` overrides); and the students' training time per step in the real runs (their logs).

Results: a markdown table on stdout, ``--out``/piflow_digits.json, and ``--picture`` (default
``docs/img/piflow_digits.png``: the teacher at 8 and 1 steps and the two students, one class per row).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GUIDANCE = 0.3  # the demo's probabilistic guidance w̃, distilled into the students (configs/digits_piflow.py)
PER_CLASS = 100
GRID_PER_CLASS = 8
SEED = 2024  # the starting noise of every row but the noise-floor one (SEED + 1)
STUDENT_STEPS = 1000  # the config's own: a distillation step takes ~0.23 s on 2 cores
REPEATS = 3  # warm sampling repeats (median times)
TIMING_FILE = "bench_piflow_timing.json"  # what this script's training runs took, in each workdir


# --- training ---------------------------------------------------------------------------------------


def newest_step(workdir: str) -> int:
    from gmflow_jax.checkpoint import CHECKPOINT_DIR, list_steps

    return max(list_steps(os.path.join(workdir, CHECKPOINT_DIR)), default=0)


def parse_train_log(text: str) -> dict[str, float]:
    """The trainer's own times from its absl log: the step's compile and the training loop."""
    out = {}
    compiled = re.search(r"compiled the train step in ([\d.]+) s", text)
    done = re.search(r"done: step (\d+), ([\d.]+) s in the loop", text)
    if compiled:
        out["compile_s"] = float(compiled.group(1))
    if done:
        out["end_step"], out["loop_s"] = int(done.group(1)), float(done.group(2))
    return out


def train_run(config: str, workdir: str, steps: int, flags: list[str]) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` up to ``steps`` with the trainer's command line (resuming; nothing
    to do when the newest checkpoint is there already). Returns this call's numbers and every earlier
    run of this script in the workdir (``TIMING_FILE``)."""
    path = os.path.join(workdir, TIMING_FILE)
    try:
        with open(path) as f:
            runs = json.load(f)
    except (OSError, ValueError):
        runs = []
    start = newest_step(workdir)
    if start >= steps:
        print(f"[piflow] {config}: {workdir} has step {start} >= {steps}: reused", flush=True)
        return {"config": config, "workdir": workdir, "steps": steps, "reused": True, "runs": runs}
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "gmflow_jax.train", "--config", config, "--workdir", workdir]
    cmd += [f"--config.num_steps={steps}", *flags]
    print(f"[piflow] training from step {start}: {' '.join(cmd[1:])}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(workdir, f"bench_train_{start}_{steps}.log"), "w") as f:
        f.write(out.stdout + out.stderr)
    if out.returncode:
        raise SystemExit(f"training {config} failed (rc {out.returncode}):\n{out.stderr[-4000:]}")
    run = {
        "start_step": start,
        "end_step": steps,
        "wall_s": round(wall, 1),
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
        **parse_train_log(out.stderr),
    }
    run["loop_s_per_step"] = round(run.get("loop_s", wall) / (steps - start), 4)
    runs.append(run)
    with open(path, "w") as f:
        json.dump(runs, f, indent=2)
    print(f"[piflow] {config}: {json.dumps(run)}", flush=True)
    return {"config": config, "workdir": workdir, "steps": steps, "reused": False, "runs": runs}


# --- sampling and measuring ---------------------------------------------------------------------------


def timed(fn) -> tuple[np.ndarray, dict[str, float]]:
    """``fn()`` once to compile, then ``train_step._median_time`` (a warm-up and ``REPEATS`` calls):
    (samples, {first s, median wall s, median CPU s})."""
    from train_step import _median_time

    t0 = time.perf_counter()
    x = np.asarray(fn())
    first = time.perf_counter() - t0
    cpu, wall = _median_time(fn, REPEATS)
    return x, {"first_s": round(first, 2), "wall_s": wall, "cpu_s": cpu}


def student_sampler(workdir: str, step: int | None):
    """``(fn(noise, labels) -> x0, step, nfe)``: the student's EMA weights, sampled by its own policy."""
    import jax
    from flax import nnx

    from gmflow_jax import piflow
    from gmflow_jax.sampling import Sampler

    s = Sampler.from_checkpoint(workdir, step=step)
    d = s.config.distill
    nfe, substeps = int(d.nfe), int(d.total_substeps)

    @jax.jit
    def run(params, noise, labels):
        student_fn = nnx.merge(s.graphdef, params).net
        return piflow.piflow_sample(student_fn, noise, labels, num_steps=nfe, total_substeps=substeps)

    return (lambda noise, labels: run(s.params, noise, labels)), s.step, nfe


def evaluate(teacher_dir: str, students: list[tuple[str, str, int | None]]) -> tuple[dict, dict, np.ndarray]:
    """Measures the teacher's rows and ``students`` ``(row name, workdir, step)``; returns (rows, samples, labels)."""
    import jax
    import jax.numpy as jnp

    from gmflow_jax.data import digits_arrays
    from gmflow_jax.demo import fit_classifier, frechet_distance, measure
    from gmflow_jax.sampling import Sampler

    teacher = Sampler.from_checkpoint(teacher_dir)
    real, real_labels = digits_arrays()
    clf, real_acc = fit_classifier(real, real_labels)
    labels = teacher.class_grid(PER_CLASS)
    n = len(labels)
    shape = (n, *teacher.data_shape)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(SEED), shape, jnp.float32))
    other = np.asarray(jax.random.normal(jax.random.PRNGKey(SEED + 1), shape, jnp.float32))

    def gm_ode(steps: int, start: np.ndarray):
        kw = dict(solver="gm-ode", order=2, num_steps=steps, guidance=GUIDANCE, noise=start, batch_size=n)
        return lambda: teacher.sample(0, labels, **kw)

    rows: list[tuple[str, Any, int, dict]] = [
        ("teacher 8 steps", gm_ode(8, noise), 16, {"steps": 8}),
        ("teacher 8 steps, other noise", gm_ode(8, other), 16, {"steps": 8}),
        ("teacher 2 steps", gm_ode(2, noise), 4, {"steps": 2}),
        ("teacher 1 step", gm_ode(1, noise), 2, {"steps": 1}),
    ]
    for name, workdir, step in students:
        fn, got_step, nfe = student_sampler(workdir, step)
        rows.append((name, (lambda f=fn: f(noise, labels)), nfe, {"steps": nfe, "train_step": got_step}))

    results, samples = {"real": {"classifier_heldout_accuracy": real_acc}}, {}
    for name, fn, forwards, extra in rows:
        x, t = timed(fn)
        m = measure(x, labels, clf, real)
        m.update(extra, forwards_per_sample=forwards, samples_per_s=n / t["wall_s"], **t)
        m["cpu_s_per_1000"] = 1000.0 * t["cpu_s"] / n
        if samples:
            m["frechet_to_teacher8"] = frechet_distance(np.clip(x, -1, 1), np.clip(samples["teacher 8 steps"], -1, 1))
        else:
            m["frechet_to_teacher8"] = 0.0
        results[name], samples[name] = m, x
        print(
            f"[piflow] {name}: acc {m['classifier_accuracy']:.3f}, within-class std {m['within_class_std']:.3f}, "
            f"FD real {m['frechet_pixels']:.2f}, FD teacher8 {m['frechet_to_teacher8']:.2f}, "
            f"{m['samples_per_s']:.0f} samples/s ({t['first_s']:.1f} s with compile)",
            flush=True,
        )
    return results, samples, labels


def targets(rows: dict, student: str) -> list[tuple[str, bool]]:
    """The issue's three targets for the 1-NFE student row ``student``, as (line, passed)."""
    t8, t1, s = rows["teacher 8 steps"], rows["teacher 1 step"], rows[student]
    acc_gap = s["classifier_accuracy"] - t8["classifier_accuracy"]
    std_ratio = s["within_class_std"] / t8["within_class_std"]
    fd_ratio = s["frechet_to_teacher8"] / t1["frechet_to_teacher8"]
    return [
        (
            f"accuracy within 0.02 of the 8-step teacher's: {s['classifier_accuracy']:.3f} vs "
            f"{t8['classifier_accuracy']:.3f} ({acc_gap:+.3f})",
            acc_gap >= -0.02,
        ),
        (
            f"within-class std ≥ 0.9 × the teacher's: {s['within_class_std']:.3f} vs {t8['within_class_std']:.3f} "
            f"(× {std_ratio:.2f})",
            std_ratio >= 0.9,
        ),
        (
            f"Fréchet distance to the teacher's 8-step samples ≤ 0.5 × the teacher's 1-step: "
            f"{s['frechet_to_teacher8']:.2f} vs {t1['frechet_to_teacher8']:.2f} (× {fd_ratio:.2f})",
            fd_ratio <= 0.5,
        ),
    ]


def save_picture(samples: dict, labels: np.ndarray, names: list[str], titles: list[str], path: str) -> None:
    """One panel per row name (one class per row, ``GRID_PER_CLASS`` samples), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gmflow_jax.demo import grid_subset
    from gmflow_jax.viz import render

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 5.6))
    for ax, name, title in zip(axes, names, titles, strict=True):
        ax.imshow(render(grid_subset(samples[name], labels, GRID_PER_CLASS), 10), interpolation="nearest")
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    fig.suptitle("pi-Flow students of the digits GM-DiT: one class per row (0–9), same starting noise", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


# --- the cost of a step ---------------------------------------------------------------------------------


def set_fields(config, items: list[str]) -> None:
    """``KEY=VALUE`` overrides (``distill.total_substeps=32``; Python literals) of a config, in place."""
    for item in items:
        key, value = item.split("=", 1)
        *path, leaf = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[leaf] = ast.literal_eval(value)


def step_cost(teacher_dir: str, steps: int, student: str = "digits_piflow", overrides: list[str] = ()) -> dict:
    """Median CPU (and wall) seconds of the trainer's jitted step: a distillation step of ``student``
    (``overrides``: ``set_fields``) and the teacher's training step, alternated on the same random batch
    of 64. The pi-ID rollouts run as many sub-steps as the batch's longest gap needs, so a step's time
    varies with its draws: the median of ``steps``."""
    import jax
    from common import synthetic_train_setup

    from gmflow_jax.train.config import load_config
    from gmflow_jax.train.distill import flops_per_example, load_teacher, setup_teacher
    from gmflow_jax.train.state import init_state
    from gmflow_jax.train.step import jit_train_step
    from gmflow_jax.utilization import train_flops_per_example

    tconfig = load_config("digits_gmdit")
    _, tsetup, tstep, batch = synthetic_train_setup(tconfig)
    sconfig = load_config(student)
    set_fields(sconfig, list(overrides))
    sconfig.distill.teacher = teacher_dir
    mesh, ssetup, _, sbatch = synthetic_train_setup(sconfig)
    teacher = setup_teacher(sconfig, mesh)
    tparams = load_teacher(teacher)
    sstep = jit_train_step(sconfig, ssetup, mesh, teacher)
    cases = {
        "teacher": [lambda s: tstep(s, batch), init_state(tsetup, 0)],
        "student": [lambda s: sstep(s, sbatch, tparams), init_state(ssetup, 0)],
    }
    out: dict[str, Any] = {}
    for name, case in cases.items():
        t0 = time.perf_counter()
        case[1], metrics = case[0](case[1])  # compile + first step
        jax.block_until_ready(metrics)
        out[f"{name}_first_s"] = round(time.perf_counter() - t0, 2)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(steps):
        for name, case in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            case[1], metrics = case[0](case[1])
            jax.block_until_ready(metrics)
            times[name].append((time.process_time() - c0, time.perf_counter() - t0))
    for name, pairs in times.items():
        out[f"{name}_cpu_s"] = statistics.median(c for c, _ in pairs)
        out[f"{name}_wall_s"] = statistics.median(w for _, w in pairs)
    out["cpu_ratio"] = out["student_cpu_s"] / out["teacher_cpu_s"]
    out["wall_ratio"] = out["student_wall_s"] / out["teacher_wall_s"]
    out["flops_ratio"] = flops_per_example(sconfig, teacher) / train_flops_per_example(tconfig.model)
    out.update(timed_steps=steps, student=student, overrides=list(overrides))
    return out


# --- the report -----------------------------------------------------------------------------------------


def training_line(run: dict) -> str:
    """``S steps: W s wall, C s CPU, L s/step in the loop`` over this script's runs in the workdir."""
    runs = run["runs"]
    if not runs:
        return f"{run['workdir']}: trained before this script (no timing recorded)"
    steps = sum(r["end_step"] - r["start_step"] for r in runs)
    loop = sum(r.get("loop_s", r["wall_s"]) for r in runs)
    return (
        f"{run['config']} → {run['workdir']}: {steps} steps, {sum(r['wall_s'] for r in runs):.0f} s wall "
        f"({sum(r['cpu_s'] for r in runs):.0f} s CPU), {loop / steps:.3f} s/step in the training loop"
    )


def cost_line(cost: dict) -> str:
    return (
        f"cost ({cost['student']} {' '.join(cost['overrides'])}): distillation step {cost['student_cpu_s']:.3f} s "
        f"CPU ({cost['student_wall_s']:.3f} s wall) vs teacher training step {cost['teacher_cpu_s']:.3f} s CPU "
        f"({cost['teacher_wall_s']:.3f} s wall), median of {cost['timed_steps']}: × {cost['cpu_ratio']:.2f} CPU, "
        f"× {cost['wall_ratio']:.2f} wall (target ≤ 3: {'PASS' if cost['wall_ratio'] <= 3 else 'FAIL'}), "
        f"× {cost['flops_ratio']:.2f} model FLOPs"
    )


def print_report(result: dict) -> None:
    rows = result["rows"]
    print(f"\npi-Flow students on the digits, {result['date']}, {result['machine']}\n")
    print(
        "| sampler | steps | network forwards / sample | classifier acc | within-class std | "
        "Fréchet to real | Fréchet to teacher 8-step | samples/s (warm) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in rows.items():
        if name == "real":
            continue
        fd_t = "—" if name == "teacher 8 steps" else f"{m['frechet_to_teacher8']:.2f}"
        print(
            f"| {name} | {m['steps']} | {m['forwards_per_sample']} | {m['classifier_accuracy']:.3f} | "
            f"{m['within_class_std']:.3f} | {m['frechet_pixels']:.2f} | {fd_t} | {m['samples_per_s']:.0f} |"
        )
    print(f"\nreal digits: classifier held-out accuracy {rows['real']['classifier_heldout_accuracy']:.3f}")
    for student, lines in result["targets"].items():
        print(f"\ntargets, {student}:")
        for line, ok in lines:
            print(f"- {'PASS' if ok else 'FAIL'}: {line}")
    if result.get("cost"):
        print("\n" + cost_line(result["cost"]))
    print("\ntraining:")
    for run in result["training"].values():
        print(f"- {training_line(run)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(ROOT / "results" / "digits_demo"), help="the teacher's workdir")
    parser.add_argument("--out", default=str(ROOT / "results" / "piflow_digits"), help="the students' workdirs")
    parser.add_argument("--student_steps", type=int, default=STUDENT_STEPS, help="training steps of each student")
    parser.add_argument("--more_steps", type=int, default=None, help="the 1-NFE student trained on to this too")
    parser.add_argument("--cost_steps", type=int, default=20, help="timed steps of each kind for the cost")
    parser.add_argument("--skip_cost", action="store_true")
    parser.add_argument("--cost_only", action="store_true", help="only the cost of a step (no training, sampling)")
    parser.add_argument("--cost_config", default="digits_piflow", help="the student config whose step is timed")
    parser.add_argument("--cost_set", nargs="*", default=[], help="KEY=VALUE overrides of it, for --cost_only")
    parser.add_argument("--picture", default=str(ROOT / "docs" / "img" / "piflow_digits.png"))
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from common import machine, today

    from gmflow_jax.train.config import load_config

    teacher_dir, out = os.path.abspath(args.teacher), os.path.abspath(args.out)
    if args.cost_only:
        if not newest_step(teacher_dir):
            raise SystemExit(f"--cost_only needs a trained teacher; {teacher_dir} has no checkpoint.")
        cost = step_cost(teacher_dir, args.cost_steps, args.cost_config, args.cost_set)
        print(f"cost, {today()}, {machine()}: {json.dumps(cost)}")
        print(cost_line(cost))
        return
    steps = args.student_steps
    flags = [f"--config.distill.teacher={teacher_dir}", "--config.checkpoint.keep=20"]
    training = {"teacher": train_run("digits_gmdit", teacher_dir, int(load_config("digits_gmdit").num_steps), [])}
    nfe1, nfe2 = os.path.join(out, "nfe1"), os.path.join(out, "nfe2")
    training["nfe1"] = train_run("digits_piflow", nfe1, steps, flags)
    training["nfe2"] = train_run("digits_piflow:2", nfe2, steps, flags)
    students = [(f"student 1 NFE ({steps} steps)", nfe1, steps), (f"student 2 NFE ({steps} steps)", nfe2, steps)]
    if args.more_steps and args.more_steps > steps:
        training["nfe1_more"] = train_run("digits_piflow", nfe1, args.more_steps, flags)
        students.append((f"student 1 NFE ({args.more_steps} steps)", nfe1, args.more_steps))

    rows, samples, labels = evaluate(teacher_dir, students)
    one_nfe = [name for name, _, _ in students if "1 NFE" in name]
    result = {
        "date": today(),
        "machine": machine(),
        "teacher": teacher_dir,
        "guidance": GUIDANCE,
        "num_samples": len(labels),
        "seed": SEED,
        "rows": rows,
        "targets": {name: targets(rows, name) for name in one_nfe},
        "training": training,
    }
    if not args.skip_cost:
        result["cost"] = step_cost(teacher_dir, args.cost_steps)
    names = ["teacher 8 steps", "teacher 1 step", one_nfe[-1], students[1][0]]
    titles = [
        f"{n}\nacc {rows[n]['classifier_accuracy']:.3f}, Fréchet to teacher 8 steps "
        + ("—" if n == "teacher 8 steps" else f"{rows[n]['frechet_to_teacher8']:.2f}")
        for n in names
    ]
    save_picture(samples, labels, names, titles, args.picture)
    with open(os.path.join(out, "piflow_digits.json"), "w") as f:
        json.dump(result, f, indent=2)
    print_report(result)
    print(f"\nwrote {os.path.join(out, 'piflow_digits.json')} and {args.picture}")


if __name__ == "__main__":
    main()
