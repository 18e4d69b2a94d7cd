"""``python -m gmflow_jax.evaluate``: samples a checkpoint for a guidance sweep and scores the samples.

With ``--ref`` (the Inception weights fetched when ``--inception`` is not given), or for a digits run without it,
every setting's row of ``metrics.json`` gets ``fid``, ``sfid``, ``is`` (``is_std``), ``precision``, ``recall`` and
``saturation``; ``metrics.csv`` and the sweep plots are redrawn from all rows of ``--out`` (so runs of several
solver settings into one folder share the plots).
"""

from __future__ import annotations

import os

import jax
from absl import app, flags

from gmflow_jax import checkpoint, cli, solvers, storage
from gmflow_jax.evaluate import plots, scoring
from gmflow_jax.evaluate.sampling import Setting, evaluate_samples, read_metrics, write_metrics
from gmflow_jax.multihost import barrier
from gmflow_jax.sampling import SOLVERS, Sampler

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Trainer workdir (or a converted published checkpoint).")
flags.DEFINE_string("out", None, "Output folder (local or gs://): one sub-folder per setting, metrics.json on top.")
flags.DEFINE_integer("num_samples", 50_000, "Samples per setting.")
flags.DEFINE_enum("solver", None, SOLVERS, "Solver (default: 'piflow' for a pi-Flow student, else 'gm-ode').")
flags.DEFINE_integer("order", 2, "Order of the GM solvers.")
flags.DEFINE_integer("num_steps", None, "Sampling steps (default: 8; a pi-Flow student: config.distill.nfe).")
flags.DEFINE_integer("num_substeps", 1, "GM-ODE sub-steps per step.")
flags.DEFINE_integer("total_substeps", None, "piflow: the policy's Euler sub-steps (default: config.distill's).")
flags.DEFINE_float("temperature", None, "piflow: the policy's temperature (default: config.distill's).")
flags.DEFINE_list("guidance", ["0.0"], "Guidance values, comma-separated: one compiled sweep.")
flags.DEFINE_float("orthogonal", None, "Guidance bias projection (default: 1 for GM solvers, 0 for baselines).")
flags.DEFINE_float("shift", None, "Time-grid shift (default: 1; a pi-Flow student: config.distill.shift).")
flags.DEFINE_integer("seed", 0, "Seed of the labels, the noise and the solver.")
flags.DEFINE_integer("chunk_size", 256, "Samples per compiled call and per resumable chunk (fixes GM-SDE noise).")
flags.DEFINE_string(
    "ref",
    None,
    "Reference: the ADM batch (VIRTUAL_imagenet256_labeled.npz) or one of ours; a path, "
    "gs:// or http(s):// URL (downloaded into $GMFLOW_JAX_CACHE, else ~/.cache/gmflow_jax).",
)
flags.DEFINE_string("inception", None, "pytorch-fid's Inception weights: a path, gs:// or http(s):// URL (default: "
                    "the official URL, downloaded into the cache once, when the reference needs them).")  # fmt: skip
flags.DEFINE_enum("input_transform", None, ["tf", "pytorch-fid"], "The Inception's input path (default: the "
                  "reference's; 'tf' for the ADM batch); one differing from the reference's is refused.")  # fmt: skip
flags.DEFINE_bool("allow_fewer_samples", False, "Score even with fewer samples than the reference's protocol needs.")
flags.DEFINE_integer("feature_batch", 200, "Images per Inception call (rounded up to a multiple of the devices).")
cli.define_multihost_flags()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required.")
    try:
        guidance = [float(v) for v in FLAGS.guidance]
    except ValueError as e:
        raise ValueError(f"--guidance must be numbers separated by commas; got {FLAGS.guidance!r}.") from e
    setting = Setting(
        FLAGS.solver,
        FLAGS.order,
        FLAGS.num_steps,
        FLAGS.num_substeps,
        FLAGS.orthogonal,
        FLAGS.shift,
        FLAGS.total_substeps,
        FLAGS.temperature,
    )
    solver = setting.solver or "gm-ode"  # a default solver is 'gm-ode' unless the model is a pi-Flow student
    if solver in solvers.SOLVERS:  # checked before anything is loaded; 'piflow' is checked against the model
        steps = 8 if setting.num_steps is None else setting.num_steps
        solvers.check_settings(solver, setting.order, steps, setting.num_substeps, guidance)
    storage.check_writable(FLAGS.out, "--out")
    cli.initialize_multihost()
    sampler = Sampler.from_checkpoint(FLAGS.workdir)
    setting = setting.resolve(sampler)
    net, ref = scoring.prepare(
        sampler,
        FLAGS.out,
        FLAGS.ref,
        FLAGS.inception,
        FLAGS.num_samples,
        FLAGS.allow_fewer_samples,
        FLAGS.feature_batch,
        FLAGS.input_transform,
    )  # every check before the first sample is drawn
    rows = evaluate_samples(
        sampler,
        FLAGS.out,
        setting,
        guidance,
        num_samples=FLAGS.num_samples,
        seed=FLAGS.seed,
        chunk_size=FLAGS.chunk_size,
    )
    if net is not None:
        folders = [os.path.dirname(r["samples"]) for r in rows]
        for folder in folders:
            scoring.featurise_setting(folder, net)
        barrier("gmflow_evaluate_features")
    if jax.process_index() != 0:
        return
    for row in rows if net is not None else ():
        row.update(scoring.score(scoring.setting_features(os.path.dirname(row["samples"]), net), ref))
        row.update(feature_network=net.name, reference=ref.path)
    path = write_metrics(FLAGS.out, rows)
    every = read_metrics(FLAGS.out)
    plots.write_csv(every, storage.workdir_path(FLAGS.out) / "metrics.csv")
    pictures = plots.plot_sweep(every, FLAGS.out)
    if net is not None:
        print(plots.table(every), flush=True)
    print(f"wrote {len(rows)} setting(s), {path}" + (f" and {len(pictures)} plots" if pictures else ""), flush=True)


if __name__ == "__main__":
    cli.run(main, prog="gmflow_jax.evaluate", expected=(ValueError, OSError, checkpoint.CheckpointError))
