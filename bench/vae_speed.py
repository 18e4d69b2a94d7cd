"""VAE encode / decode throughput on this machine: compile time, images/s and peak host memory.

The sd-vae-ft-ema architecture (default ``VAEConfig``: 4 levels 128-256-512-512, 2 ResNets per level) with
random weights (nothing is downloaded), through the public jitted, batch-sharded ``encode`` / ``decode`` of
``gmflow_jax.models.vae``: uint8 images (N, S, S, 3) -> scaled latents (N, S/8, S/8, 4) -> uint8 images.
Each direction runs in its own subprocess so that its peak resident memory (``resource.getrusage``) is its
own. The first call compiles (timed with ``jax.monitoring`` compile events); the timed repetitions that
follow report their median.

    python bench/vae_speed.py                       # encode and decode, batch 8, 256×256, markdown table
    python bench/vae_speed.py --repeats 2 --size 128
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("encode", "decode")
DTYPES = ("float32", "bfloat16")


def run_case(name: str, batch: int, size: int, repeats: int, dtype: str) -> dict:
    """Measures one direction in this process; returns a JSON-able dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from gmflow_jax.models.vae import AutoencoderKL, VAEConfig
    from gmflow_jax.models.vae_apply import decode, encode

    config = VAEConfig()
    vae = AutoencoderKL(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
    params = sum(p.size for p in jax.tree.leaves(nnx.state(vae, nnx.Param)))
    rng = np.random.default_rng(0)
    if name == "encode":
        fn, inputs = encode, rng.integers(0, 256, (batch, size, size, config.in_channels), dtype=np.uint8)
    else:
        lat = size // config.downsample_factor
        fn, inputs = decode, rng.standard_normal((batch, lat, lat, config.latent_channels)).astype(np.float32)

    def call() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(vae, inputs))
        return time.perf_counter() - t0

    compile_events: list[float] = []

    def on_event(event: str, duration: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):  # trace, lowering and XLA compile of the first call
            compile_events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    first_s = call()
    jax.monitoring.unregister_event_duration_listener(on_event)
    times = [call() for _ in range(repeats)]
    median = statistics.median(times)
    return {
        "case": name,
        "params": params,
        "batch": batch,
        "size": size,
        "dtype": dtype,
        "first_s": first_s,
        "compile_s": sum(compile_events),
        "median_s": median,
        "images_per_s": batch / median,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the compiling first call")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (params stay float32)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "bench"))
    from common import machine, print_result, run_case_subprocess, today

    if args.one:
        result = run_case(args.one, args.batch, args.size, args.repeats, args.dtype)
        print_result(result)
        return

    rows = []
    for name in args.cases:
        cmd = [__file__, "--one", name, "--batch", str(args.batch), "--size", str(args.size)]
        cmd += ["--repeats", str(args.repeats), "--dtype", args.dtype]
        rows.append(run_case_subprocess(cmd, name))

    print(f"VAE (sd-vae-ft-ema architecture, random weights), {today()}, {machine()}\n")
    print(
        "| direction | params | batch | image | dtype | compile (s) | median call (s) | images/s | peak host RSS (MB) |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['size']}×{r['size']} | {r['dtype']} | "
            f"{r['compile_s']:.1f} | {r['median_s']:.2f} | {r['images_per_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    print(
        f"\ncompile: tracing + lowering + XLA compilation in the first call (jax.monitoring); median of "
        f"{args.repeats} timed calls after the first, "
        "through the public jitted encode / decode (uint8 images)."
    )


if __name__ == "__main__":
    main()
