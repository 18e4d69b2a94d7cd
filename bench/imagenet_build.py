"""``imagenet_latents`` build rate on this machine: images/s and peak host memory of the build command.

Writes a synthetic ImageNet (random JPEGs of 300–500 px sides) and a VAE with sd-vae-ft-ema's default
architecture and random weights (a diffusers folder), then runs ``python -m gmflow_jax.data.build_imagenet``
at 256² as a subprocess. *Steady* images/s is measured between the first and the last shard's progress
line (compilation excluded); *end to end* is images over the command's wall time (start-up, VAE load,
compilation, TFDS assembly included). Peak RSS is the build process's.

    python bench/imagenet_build.py                      # 32 images, batch 8, markdown table
    python bench/imagenet_build.py --images 64 --batch 16
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_LINE = re.compile(r"^I\d{4} (\d\d:\d\d:\d\d\.\d+) .*shard (\d+)/(\d+) written \((\d+)/")


def steady_rate(log: str) -> float:
    """Images/s between the first and the last shard's progress lines of the build log."""
    points = [
        (datetime.strptime(m.group(1), "%H:%M:%S.%f"), int(m.group(4)))
        for m in (SHARD_LINE.match(line) for line in log.splitlines())
        if m
    ]
    if len(points) < 2:
        return float("nan")
    (t0, n0), (t1, n1) = points[0], points[-1]
    return (n1 - n0) / (t1 - t0).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="synthetic images (over 4 synsets)")
    parser.add_argument("--batch", type=int, default=8, help="--batch_size of the build (= its --shard_size)")
    parser.add_argument("--image_size", type=int, default=256)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "bench"))
    from common import machine, today

    from gmflow_jax.data import images, synthetic

    with tempfile.TemporaryDirectory() as tmp:
        src = synthetic.write_synthetic_imagenet(
            os.path.join(tmp, "src"), num_synsets=4, per_class=args.images // 4, sizes=(300, 500)
        )
        vae = synthetic.write_random_vae(os.path.join(tmp, "vae"))
        n = len(images.list_images(src)[1])
        cmd = [
            sys.executable,
            "-m",
            "gmflow_jax.data.build_imagenet",
            f"--source={src}",
            f"--data_dir={os.path.join(tmp, 'data')}",
            f"--vae={vae}",
            f"--image_size={args.image_size}",
            f"--batch_size={args.batch}",
            f"--shard_size={args.batch}",
        ]
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if out.returncode:
            raise SystemExit(f"build failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    steady = steady_rate(out.stderr)

    print(f"imagenet_latents build, {today()}, {machine()}\n")
    print("| images (1 corrupt) | crop | VAE | batch | steady images/s | end to end (s) | peak host RSS (MB) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    print(
        f"| {n} | {args.image_size}² | sd-vae default arch, random weights, float32 | {args.batch} | {steady:.2f} | "
        f"{wall:.0f} | {peak_mb:.0f} |"
    )


if __name__ == "__main__":
    main()
