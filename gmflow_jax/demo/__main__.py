"""``python -m gmflow_jax.demo``: the ``make demo`` driver (see ``gmflow_jax.demo``)."""

from __future__ import annotations

import os

from absl import app, flags, logging

from gmflow_jax import checkpoint, cli
from gmflow_jax.demo import CONFIG, run_demo
from gmflow_jax.train import TrainingError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", os.path.join("results", "digits_demo"), "Run directory of the demo.")
flags.DEFINE_string("data_dir", "", "TFDS directory ('': $GMFLOW_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_float("guidance", 0.3, "Probabilistic guidance w̃ of the guided settings, in (0, 1).")
flags.DEFINE_integer("eval_per_class", 100, "Samples per class for the measurements.")
flags.DEFINE_integer("steps", 8, "Sampling steps.")
flags.DEFINE_integer("train_steps", None, "Override the config's training steps.")
flags.DEFINE_string("config", CONFIG, "Training config (a packaged name or a file, with ':arg').")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not 0.0 < FLAGS.guidance < 1.0:
        raise ValueError(f"--guidance must lie in (0, 1); got {FLAGS.guidance}.")
    logging.set_verbosity(logging.INFO)
    run_demo(
        FLAGS.workdir,
        data_dir=FLAGS.data_dir,
        guidance=FLAGS.guidance,
        eval_per_class=FLAGS.eval_per_class,
        num_steps=FLAGS.steps,
        train_steps=FLAGS.train_steps,
        train_config=FLAGS.config,
    )


if __name__ == "__main__":
    cli.run(main, prog="gmflow_jax.demo", expected=(ValueError, OSError, TrainingError, checkpoint.CheckpointError))
