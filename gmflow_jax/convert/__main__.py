"""``python -m gmflow_jax.convert --from DIR --workdir DIR``: a published GMFlow pipeline folder, or one of the
authors' pi-Flow student folders (``[--nfe N] [--time_scale S] [--vae DIR]``), -> our workdir."""

from __future__ import annotations

from absl import app, flags

from gmflow_jax import checkpoint, cli
from gmflow_jax.convert import convert

FLAGS = flags.FLAGS
flags.DEFINE_string("from", None, "Published GMFlow pipeline folder, local or gs:// (transformer/, vae/, ...).")
flags.DEFINE_string("workdir", None, "Output workdir, local or gs:// (new or empty).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype in the written config (default: recipe's).")
flags.DEFINE_integer(
    "nfe", None, "pi-Flow student: its network evaluations, distill.nfe (default: the folder name's _<N>step)."
)
flags.DEFINE_float(
    "time_scale",
    None,
    "pi-Flow student: the network sees sigma * time_scale, the authors' num_timesteps (1000 for gmdit_* students, "
    "1 for gmrepa_*; default: from the folder name).",
)
flags.DEFINE_string(
    "vae", None, "A diffusers AutoencoderKL folder to decode with (a pipeline without vae/, a student)."
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["from"].value or not FLAGS.workdir:
        raise app.UsageError("--from and --workdir are required.")
    path = convert(
        FLAGS["from"].value, FLAGS.workdir, nfe=FLAGS.nfe, time_scale=FLAGS.time_scale, vae=FLAGS.vae, dtype=FLAGS.dtype
    )
    print(f"wrote {path}; sample with Sampler.from_checkpoint({FLAGS.workdir!r})", flush=True)


if __name__ == "__main__":
    cli.run(main, prog="gmflow_jax.convert", expected=(ValueError, OSError, KeyError, checkpoint.CheckpointError))
