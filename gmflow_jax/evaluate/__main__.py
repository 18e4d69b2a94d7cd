"""``python -m gmflow_jax.evaluate``: samples a checkpoint for evaluation (see ``gmflow_jax.evaluate``)."""

from __future__ import annotations

from absl import app, flags

from gmflow_jax import checkpoint, cli, solvers
from gmflow_jax.evaluate.sampling import Setting, evaluate_samples, write_metrics
from gmflow_jax.sampling import Sampler

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Trainer workdir (or a converted published checkpoint).")
flags.DEFINE_string("out", None, "Output folder: one sub-folder per setting, metrics.json on top.")
flags.DEFINE_integer("num_samples", 50_000, "Samples per setting.")
flags.DEFINE_enum("solver", "gm-ode", solvers.SOLVERS, "Solver.")
flags.DEFINE_integer("order", 2, "Order of the GM solvers.")
flags.DEFINE_integer("num_steps", 8, "Sampling steps.")
flags.DEFINE_integer("num_substeps", 1, "GM-ODE sub-steps per step.")
flags.DEFINE_list("guidance", ["0.0"], "Guidance values, comma-separated: one compiled sweep.")
flags.DEFINE_float("orthogonal", None, "Guidance bias projection (default: 1 for GM solvers, 0 for baselines).")
flags.DEFINE_float("shift", 1.0, "Time-grid shift.")
flags.DEFINE_integer("seed", 0, "Seed of the labels, the noise and the solver.")
flags.DEFINE_integer("chunk_size", 256, "Samples per compiled call and per resumable chunk (fixes GM-SDE noise).")
flags.DEFINE_string("ref", None, "ADM reference batch (.npz) for the metrics.")
flags.DEFINE_string("inception", None, "pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth).")
cli.define_multihost_flags()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required.")
    if FLAGS.ref or FLAGS.inception:
        raise ValueError(
            "--ref/--inception: the JAX Inception network is not in this version yet; the samples.npz files are "
            "in the ADM format, so run the ADM evaluator on them."
        )
    try:
        guidance = [float(v) for v in FLAGS.guidance]
    except ValueError as e:
        raise ValueError(f"--guidance must be numbers separated by commas; got {FLAGS.guidance!r}.") from e
    cli.initialize_multihost()
    sampler = Sampler.from_checkpoint(FLAGS.workdir)
    setting = Setting(FLAGS.solver, FLAGS.order, FLAGS.num_steps, FLAGS.num_substeps, FLAGS.orthogonal, FLAGS.shift)
    rows = evaluate_samples(
        sampler,
        FLAGS.out,
        setting,
        guidance,
        num_samples=FLAGS.num_samples,
        seed=FLAGS.seed,
        chunk_size=FLAGS.chunk_size,
    )
    path = write_metrics(FLAGS.out, rows)
    print(f"wrote {len(rows)} setting(s) and {path}", flush=True)


if __name__ == "__main__":
    cli.run(main, prog="gmflow_jax.evaluate", expected=(ValueError, OSError, checkpoint.CheckpointError))
