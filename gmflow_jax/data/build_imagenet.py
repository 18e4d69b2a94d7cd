"""``python -m gmflow_jax.data.build_imagenet``: encodes an ImageNet train set into ``imagenet_latents``.

    python -m gmflow_jax.data.build_imagenet --source ILSVRC2012_img_train --data_dir DIR --vae VAE_DIR
        [--split train] [--seed 0] [--image_size 256] [--shard_size 1000] [--batch_size 64] [--threads N]
        [--multihost | --coordinator_address=HOST:PORT --num_processes=N --process_id=I]

``--source``: the folder of synset folders, a folder of per-synset tars or ``ILSVRC2012_img_train.tar``;
``--vae``: a diffusers ``AutoencoderKL`` folder (e.g. stabilityai/sd-vae-ft-ema). Run it again after an
interruption: it continues at the first missing shard. The recipe and the files: ``gmflow_jax.data.imagenet``.
A leaf module (imported by nothing): its flags are defined only when it runs.
"""

from __future__ import annotations

from absl import app, flags

from gmflow_jax import cli
from gmflow_jax.data import imagenet
from gmflow_jax.multihost import DistributedInitError

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("source", None, "ImageNet train set: folder of synset folders / synset tars, or the train tar.")
    flags.DEFINE_string("data_dir", None, "TFDS data dir to write <data_dir>/imagenet_latents/1.0.0 into.")
    flags.DEFINE_string("vae", None, "diffusers AutoencoderKL folder (config.json + safetensors weights).")
    flags.DEFINE_string("split", "train", "Split to build (only 'train').")
    flags.DEFINE_integer("seed", 0, "Seed of the flips and the posterior samples.")
    flags.DEFINE_integer("image_size", 256, "Side of the ADM centre crop.")
    flags.DEFINE_integer("shard_size", 1000, "Images per resumable shard.")
    flags.DEFINE_integer("batch_size", 64, "Images per VAE call (split over the local devices); fixes the noise.")
    flags.DEFINE_integer("threads", 0, "Decode/crop threads (0: one per CPU).")
    cli.define_multihost_flags()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not (FLAGS.source and FLAGS.data_dir and FLAGS.vae):
        raise app.UsageError("--source, --data_dir and --vae are required.")
    cli.initialize_multihost()
    plan = imagenet.make_plan(
        FLAGS.source,
        FLAGS.data_dir,
        FLAGS.vae,
        split=FLAGS.split,
        seed=FLAGS.seed,
        image_size=FLAGS.image_size,
        shard_size=FLAGS.shard_size,
        batch_size=FLAGS.batch_size,
    )
    imagenet.build(plan, num_threads=FLAGS.threads or None)


if __name__ == "__main__":
    define_flags()
    cli.run(main, prog="gmflow_jax.data.build_imagenet", expected=(ValueError, OSError, DistributedInitError))
