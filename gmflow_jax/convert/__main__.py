"""``python -m gmflow_jax.convert --from DIR --workdir DIR``: a published pipeline folder -> our workdir."""

from __future__ import annotations

from absl import app, flags

from gmflow_jax import checkpoint, cli
from gmflow_jax.convert import convert_pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("from", None, "Published GMFlow pipeline folder, local or gs:// (transformer/, vae/, ...).")
flags.DEFINE_string("workdir", None, "Output workdir, local or gs:// (new or empty).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype in the written config (default: recipe's).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["from"].value or not FLAGS.workdir:
        raise app.UsageError("--from and --workdir are required.")
    path = convert_pipeline(FLAGS["from"].value, FLAGS.workdir, dtype=FLAGS.dtype)
    print(f"wrote {path}; sample with Sampler.from_checkpoint({FLAGS.workdir!r})", flush=True)


if __name__ == "__main__":
    cli.run(main, prog="gmflow_jax.convert", expected=(ValueError, OSError, KeyError, checkpoint.CheckpointError))
