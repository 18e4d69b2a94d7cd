"""What the paper's ImageNet evaluation costs: each stage measured on this machine's devices, then the whole
protocol (4 solver settings × 20 guidance values × 50K samples, ``launch/eval_imagenet_paper.sh``) predicted.

    python bench/eval_cost.py --stages inception --inception_batch 32          # the CPU row of docs/benchmarks.md
    python bench/eval_cost.py                                                  # every stage, full size (a GPU)

Stages (random weights: the cost does not depend on them):

* ``inception``: the FID Inception on uint8 256² images, batch ``--inception_batch``: images/s with
  ``precision=HIGHEST`` (what the evaluation uses) and DEFAULT (TF32 on GPUs), the largest relative difference of
  their ``pool`` features, and the compiled FLOPs per image (XLA cost analysis).
* ``sampler``: GM-DiT XL/2 (``--config``), GM-ODE 2 at 8 × 16 with guidance (16 network evaluations), one compiled
  call of ``--sample_batch`` samples: samples/s, and model FLOPs per sample (``utilization.gmdit_forward_flops``).
* ``vae``: the SD-VAE decoder, latents → uint8 256² images, batch ``--vae_batch``: images/s, compiled FLOPs/image.
* ``pr``: Precision/Recall of 50K against 10K 2048-D features (``metrics.precision_recall``); FID's 2048² ``sqrtm``
  on the host.

The protocol's cost: hours at the rates measured here, and per chip FLOPs ÷ (peak bf16 FLOP/s × an assumed
utilisation ``--mfu``; float32 ``HIGHEST`` for the Inception at a sixth of that) for the network stages, where this
backend's cost analysis counts them (CPU and TPU; on GPUs convolutions are opaque cuDNN calls).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, today  # noqa: E402

PROTOCOL = {"gm-ode2 8x16": 8, "gm-ode2 32x4": 32, "gm-sde2 8": 8, "gm-sde2 32": 32}  # steps; 2 NFE a guided step
GUIDANCE_VALUES, SAMPLES = 20, 50_000


def compiled_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled program; None on GPUs, where convolutions are cuDNN calls it does not count."""
    if jax.default_backend() == "gpu":
        return None
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(first call s, best of ``repeats`` later calls s)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return first, best


def random_inception(precision):
    from flax import nnx

    from gmflow_jax.evaluate.inception import InceptionV3

    net = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), precision=precision))
    rng = np.random.default_rng(0)
    for path, v in nnx.to_flat_state(nnx.state(net)):
        shape = v.get_value().shape
        if path[-1] == "kernel":
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif path[-1] in ("scale", "var"):
            value = 0.5 + rng.random(shape)
        else:
            value = 0.05 * rng.standard_normal(shape)
        v.set_value(jnp.asarray(value, jnp.float32))
    return net


def stage_inception(batch: int, repeats: int) -> dict:
    from gmflow_jax.evaluate.features import ShardedNetwork

    images = np.random.default_rng(1).integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
    out = {"batch": batch}
    pools = {}
    for name, precision in (("highest", jax.lax.Precision.HIGHEST), ("default", jax.lax.Precision.DEFAULT)):
        net = ShardedNetwork(random_inception(precision), batch)
        first, best = timed(lambda x, net=net: net(x)["pool"], images, repeats=repeats)
        pools[name] = net(images)["pool"]
        out[f"{name}_images_per_s"] = batch / best
        out[f"{name}_first_s"] = first
        if name == "highest":
            flops = compiled_flops(net.lowered((256, 256, 3)).compile())
            out["flops_per_image"] = flops / net.batch_size if flops else None
    out["default_vs_highest_rel"] = float(
        np.max(np.abs(pools["default"] - pools["highest"])) / np.max(np.abs(pools["highest"]))
    )
    return out


def stage_sampler(config_name: str, batch: int, repeats: int) -> dict:
    from flax import nnx

    from gmflow_jax.models.factory import build_model, split_params
    from gmflow_jax.sampling import Sampler
    from gmflow_jax.train.config import load_config
    from gmflow_jax.utilization import gmdit_forward_flops

    config = load_config(config_name)
    config.model.vae = ""
    graphdef, params = split_params(build_model(config.model, nnx.Rngs(0), remat=False))  # as Sampler builds it
    sampler = Sampler(graphdef, nnx.to_pure_dict(params), config)  # as from_checkpoint: a pure dict
    labels = np.arange(batch, dtype=np.int32) % max(sampler.num_classes, 1)
    kw = dict(solver="gm-ode", order=2, num_steps=8, num_substeps=16, guidance=0.1, batch_size=batch, progress=False)
    first, best = timed(lambda: sampler.sample(0, labels, **kw), repeats=repeats)
    return {
        "config": config_name,
        "batch": batch,
        "first_s": first,
        "samples_per_s": batch / best,
        "nfe": 16,
        "model_flops_per_sample": 16 * gmdit_forward_flops(config.model),
        "compute_dtype": str(config.model.get("dtype", "float32")),
    }


def stage_vae(batch: int, repeats: int) -> dict:
    from flax import nnx

    from gmflow_jax.models.vae import AutoencoderKL, VAEConfig
    from gmflow_jax.models.vae_apply import decode

    config = VAEConfig()
    vae = AutoencoderKL(config, rngs=nnx.Rngs(0))
    lat = np.random.default_rng(0).standard_normal((batch, 32, 32, config.latent_channels)).astype(np.float32)
    first, best = timed(lambda: decode(vae, lat), repeats=repeats)
    graphdef, state = nnx.split(vae)
    flops = compiled_flops(jax.jit(lambda s, z: nnx.merge(graphdef, s).decode_latents(z)).lower(state, lat).compile())
    return {"batch": batch, "first_s": first, "images_per_s": batch / best, "flops_per_image": flops and flops / batch}


def stage_pr(n_fake: int, n_ref: int) -> dict:
    import scipy.linalg

    from gmflow_jax.evaluate.metrics import precision_recall

    rng = np.random.default_rng(0)
    real = rng.standard_normal((n_ref, 2048), dtype=np.float32)
    fake = rng.standard_normal((n_fake, 2048), dtype=np.float32)
    t0 = time.perf_counter()
    precision_recall(real, fake, k=3)
    pr_s = time.perf_counter() - t0
    a = np.cov(rng.standard_normal((4096, 2048)), rowvar=False)
    t0 = time.perf_counter()
    scipy.linalg.sqrtm(a @ a)
    return {"n_fake": n_fake, "n_ref": n_ref, "pr_s": pr_s, "fid_sqrtm_s": time.perf_counter() - t0}


def predict(results: dict, mfu: float) -> list[str]:
    """The protocol's cost (markdown rows): measured rates on this device, and FLOPs ÷ utilised peak per chip."""
    from gmflow_jax.utilization import CHIPS

    nfe = sum(2 * s for s in PROTOCOL.values()) * GUIDANCE_VALUES * SAMPLES
    images = len(PROTOCOL) * GUIDANCE_VALUES * SAMPLES
    s, v, i, p = (results.get(k, {}) for k in ("sampler", "vae", "inception", "pr"))
    small = len(PROTOCOL) * GUIDANCE_VALUES * (p.get("pr_s", 0) + p.get("fid_sqrtm_s", 0)) / 3600
    rows = []
    if s and v and i:
        hours = [
            nfe / (s["samples_per_s"] * s["nfe"]) / 3600,
            images / v["images_per_s"] / 3600,
            images / i["highest_images_per_s"] / 3600,
            small,
        ]
        rows.append((f"{results['device']} (measured here)", hours))
    flops_nfe = s.get("model_flops_per_sample", 0) / max(s.get("nfe", 1), 1)
    counted = v.get("flops_per_image") and i.get("flops_per_image")
    for chip in ("h100", "v5p") if counted else ():
        peak = CHIPS[chip].peak_tflops * 1e12 * mfu
        hours = [
            nfe * flops_nfe / peak / 3600,
            images * v.get("flops_per_image", 0) / peak / 3600,
            images * i.get("flops_per_image", 0) / (peak / 6) / 3600,  # float32 HIGHEST: ~6 bf16 passes
            small,
        ]
        rows.append((f"{CHIPS[chip].name} ({mfu:.0%} of peak)", hours))
    return [f"| {name} | " + " | ".join(f"{h:.2f}" for h in hs) + f" | {sum(hs):.1f} |" for name, hs in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=["inception", "sampler", "vae", "pr"])
    parser.add_argument("--config", default="imagenet_gmdit_k8")
    parser.add_argument("--inception_batch", type=int, default=500)
    parser.add_argument("--sample_batch", type=int, default=256)
    parser.add_argument("--vae_batch", type=int, default=64)
    parser.add_argument("--pr_fake", type=int, default=50_000)
    parser.add_argument("--pr_ref", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    results = {"machine": machine(), "date": today(), "device": jax.devices()[0].device_kind}
    for stage in args.stages:
        t0 = time.perf_counter()
        if stage == "inception":
            results[stage] = stage_inception(args.inception_batch, args.repeats)
        elif stage == "sampler":
            results[stage] = stage_sampler(args.config, args.sample_batch, args.repeats)
        elif stage == "vae":
            results[stage] = stage_vae(args.vae_batch, args.repeats)
        elif stage == "pr":
            results[stage] = stage_pr(args.pr_fake, args.pr_ref)
        else:
            raise SystemExit(f"unknown stage {stage!r}")
        print(f"{stage} ({time.perf_counter() - t0:.0f} s): {json.dumps(results[stage])}", flush=True)
    print(f"\n{results['machine']}, {results['date']}\n")
    print("| chip | sampling (h) | VAE decode (h) | Inception (h) | P/R + FID (h) | total (h) |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(predict(results, args.mfu)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
