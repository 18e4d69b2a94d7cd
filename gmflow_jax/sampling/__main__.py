"""``python -m gmflow_jax.sampling``: samples from a checkpoint into an ``.npz`` and PNG grids.

    python -m gmflow_jax.sampling --workdir runs/digits --out samples.npz [--num_per_class 8] \\
        [--solver gm-ode] [--steps 8] [--guidance 0.0,0.3]
    python -m gmflow_jax.sampling --workdir runs/piflow_1step --out samples.npz   # a pi-Flow student: 'piflow'

writes ``samples`` ((N, ...) or (G, N, ...) for several guidance values), ``labels`` and
``guidance`` to the npz, plus a PNG grid per guidance value (images: one class per row; 2-D
points: a log-density histogram).
"""

from __future__ import annotations

import json
import time

import numpy as np
from absl import app, flags

from gmflow_jax import checkpoint, cli, storage
from gmflow_jax.sampling import PIFLOW, SOLVERS, Sampler
from gmflow_jax.viz import save_grid_png

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Trainer workdir, its checkpoints/ root, or a step directory.")
flags.DEFINE_string("out", None, "Output .npz, local or gs:// (PNG grids are written beside it).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest good one).")
flags.DEFINE_bool("ema", True, "Use the EMA weights (--noema: the raw parameters).")
flags.DEFINE_integer("num_per_class", 8, "Samples per class (class-conditional models).")
flags.DEFINE_integer("num_samples", 4096, "Samples (unconditional models).")
flags.DEFINE_enum("solver", None, SOLVERS, "Solver (default: 'piflow' for a pi-Flow student, else 'gm-ode').")
flags.DEFINE_integer("order", 2, "Order of the GM solvers (1 or 2).")
flags.DEFINE_integer(
    "steps",
    None,
    "Sampling steps: network evaluations per sample, twice that with guidance (default: 8; a pi-Flow student: "
    "its config.distill.nfe).",
)
flags.DEFINE_integer("substeps", 1, "GM-ODE sub-steps per step.")
flags.DEFINE_integer("total_substeps", None, "piflow: the policy's Euler sub-steps (default: config.distill's).")
flags.DEFINE_float("temperature", None, "piflow: the policy's temperature (default: config.distill's).")
flags.DEFINE_list("guidance", ["0.0"], "One guidance value, or several (comma-separated: one compiled sweep).")
flags.DEFINE_float("orthogonal", None, "Projection of the guidance bias (default: 1 for GM solvers, 0 for baselines).")
flags.DEFINE_float("shift", None, "Time-grid shift (default: 1; a pi-Flow student: its config.distill.shift).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("batch_size", 512, "Samples per compiled call.")
flags.DEFINE_bool("png", True, "Write PNG grids beside the npz (--nopng: none).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required.")
    if not FLAGS.out.endswith(".npz"):
        raise ValueError(f"--out must end in .npz; got {FLAGS.out!r}.")
    out = storage.workdir_path(FLAGS.out)  # local, file:// or gs://; refused before sampling
    storage.check_writable(out.parent, "--out's folder")
    try:
        guidance_values = [float(v) for v in FLAGS.guidance]
    except ValueError as e:
        raise ValueError(f"--guidance must be numbers separated by commas; got {FLAGS.guidance!r}.") from e
    sampler = Sampler.from_checkpoint(FLAGS.workdir, step=FLAGS.step, use_ema=FLAGS.ema)
    if sampler.num_classes:
        labels, num = sampler.class_grid(FLAGS.num_per_class), None
    else:
        labels, num = None, FLAGS.num_samples
    sweep = len(guidance_values) > 1
    policy = {"total_substeps": FLAGS.total_substeps, "temperature": FLAGS.temperature}
    setting = sampler.settings(FLAGS.solver, FLAGS.steps, FLAGS.shift, **policy)
    t0 = time.time()
    x = sampler.sample(
        FLAGS.seed,
        labels,
        num,
        order=FLAGS.order,
        num_substeps=FLAGS.substeps,
        guidance=guidance_values if sweep else guidance_values[0],
        orthogonal=FLAGS.orthogonal,
        batch_size=FLAGS.batch_size,
        **setting,
    )
    wall = time.time() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {name: FLAGS[name].value for name in ("order", "substeps", "orthogonal")}
    settings.update(setting, steps=setting["num_steps"])
    storage.write_npz(
        out,
        samples=x,
        labels=np.asarray([] if labels is None else labels, np.int32),
        guidance=np.asarray(guidance_values, np.float32),
        step=np.int64(sampler.step),
        settings=json.dumps(dict(settings, seed=FLAGS.seed, workdir=FLAGS.workdir)),
    )
    written = [str(out)]
    if FLAGS.png:
        rows = sampler.num_classes if sampler.num_classes else 1
        for w, xs in zip(guidance_values, x if sweep else x[None], strict=True):
            png = out.parent / (out.stem + (f"_w{w:g}.png" if sweep else ".png"))
            if setting["solver"] == PIFLOW:
                title = f"{PIFLOW}, {setting['num_steps']} NFE, temperature {setting['temperature']:g}"
            else:
                title = f"{setting['solver']} order {FLAGS.order}, {setting['num_steps']} steps, guidance {w:g}"
            title += f" (step {sampler.step})"
            save_grid_png(xs, png, rows, title)
            written.append(str(png))
    print(f"sampled {x.shape} in {wall:.1f} s from {sampler.path}; wrote {', '.join(written)}", flush=True)


if __name__ == "__main__":
    cli.run(main, prog="gmflow_jax.sampling", expected=(ValueError, OSError, checkpoint.CheckpointError))
