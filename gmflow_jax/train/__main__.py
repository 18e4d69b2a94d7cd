"""``python -m gmflow_jax.train``: the trainer's command line.

    python -m gmflow_jax.train --config digits_gmdit --workdir runs/digits [--config.num_steps=500]
    python -m gmflow_jax.train --config configs/checkerboard_k64.py:baseline --workdir runs/cb_fm
        [--multihost | --coordinator_address=HOST:PORT --num_processes=N --process_id=I]

``--config`` is a packaged config name or a file path, with ``:arg`` for ``get_config(arg)``; the
config is locked, so a ``--config.field=value`` typo or a wrong type stops with one line.
"""

from __future__ import annotations

from absl import app, flags

from gmflow_jax import checkpoint, cli
from gmflow_jax.multihost import DistributedInitError
from gmflow_jax.train import TrainingError, train
from gmflow_jax.train.config import define_config_flag
from gmflow_jax.train.lock import WorkdirLockedError

FLAGS = flags.FLAGS
define_config_flag("config", "Experiment config: a name in configs/ (digits_gmdit) or a file path, with ':arg'.")
flags.DEFINE_string(
    "workdir", None, "Run directory (a path, file:///... or gs://BUCKET/RUN): config, checkpoints, events, samples."
)
cli.define_multihost_flags()
flags.DEFINE_bool(
    "restart_from_scratch",
    False,
    "Start a new run at step 0 in a workdir that holds (or held) checkpoints; its files are moved to "
    "<workdir>/replaced_runs/<time>/ first, nothing is deleted.",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or not FLAGS.workdir:
        raise app.UsageError("--config and --workdir are required.")
    cli.initialize_multihost()
    train(FLAGS.config, FLAGS.workdir, restart_from_scratch=FLAGS.restart_from_scratch)


if __name__ == "__main__":
    cli.run(
        main,
        prog="gmflow_jax.train",
        expected=(
            ValueError,
            OSError,
            TrainingError,
            checkpoint.CheckpointError,
            DistributedInitError,
            WorkdirLockedError,
        ),
    )
