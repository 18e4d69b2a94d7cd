"""The published ImageNet 256² recipe (docs/method.md §9): GM-DiT XL/2, K = 8, on 32×32×4 VAE latents.

Batch 4096, 200K iterations, AdamW 2e-4 (1000-step warm-up from 0.001×), betas (0.9, 0.95),
weight decay 0.05, gradient clip 10 from step 1000, bf16 compute, λ = 0.5, logit-normal t, loss
weight 2, SpectrumMLP (weight 1), label dropout 0.1, FSDP over the 'fsdp' mesh axis; remat policy
'none' (every activation kept: the fastest, and it fits v5p-64 at 4096, docs/performance.md §7; on chips with
less memory, e.g. v4-32, use remat_policy='full' or 'minimal' with grad_accum_steps=4).

Needs the ``imagenet_latents`` dataset (256² ADM crops, 32×32×4 latents), built once with
``python -m gmflow_jax.data.build_imagenet``; set ``--config.model.vae`` to the VAE folder it was encoded
with (the trainer checks it against the dataset's record).

``get_config('tiny')`` trains a one-block GM-DiT (like ``digits_gmdit:tiny``) on the 8×8×4 latents of a
tiny synthetic ImageNet (``gmflow_jax.data.synthetic.write_synthetic_imagenet``: up to 10 synsets, 32²
crops, a VAE with downsampling factor 4), batch 8, no FSDP: the tests' model. ``get_config('fm')`` is the
flow-matching baseline of the same network (K = 1, L2 loss): the architecture of the flow-matching
DiT teacher of the authors' pi-Flow ImageNet students (``configs/imagenet_piflow_k32.py``).
"""

from __future__ import annotations

import ml_collections

from gmflow_jax.train.config import base_config, fsdp_rules

VARIANTS = ("default", "tiny", "fm")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: None / 'default', 'tiny', or 'fm' (the flow-matching baseline: K = 1, L2 loss)."""
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"imagenet_gmdit_k8 variant must be one of {VARIANTS}; got {arg!r}.")
    c = base_config()
    c.data.dataset = "imagenet_latents"
    c.data.image_size = 256
    c.data.worker_count = 8
    c.num_steps = 200_000
    c.batch_size = 4096
    c.mesh = (1, -1)
    c.sharding = fsdp_rules()
    c.windowed_einsum = False  # TPU: faster by the compiler's cost model, and less memory (docs/benchmarks.md)
    c.model.arch = "XL/2"
    c.model.input_size = 32
    c.model.in_channels = 4
    c.model.num_classes = 1000
    c.model.num_gaussians = 8
    c.model.logstd_inner_dim = 1024
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "none"  # the fastest; fits v5p-64 at 4096 (docs/benchmarks.md, remat policies)
    c.model.spectrum = True
    c.model.spectrum_base_size = (32, 32)
    c.loss.trans_ratio = 0.5
    c.loss.t_mode = "logit_normal"
    c.loss.weight = 2.0
    c.loss.spectral_weight = 1.0
    c.loss.label_dropout = 0.1
    c.optim.lr = 2e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.05
    c.optim.warmup_steps = 1000
    c.optim.warmup_init_factor = 1e-3
    c.optim.clip_norm = 10.0
    c.optim.clip_start = 1000
    c.ema.max_nimg = 30e6
    c.ema.ratio = 0.05
    c.checkpoint.every_steps = 5000
    c.checkpoint.keep = 3
    c.log.every_steps = 100
    c.log.sample_every_steps = 10_000
    c.log.sample_per_class = 8
    if variant == "fm":
        c.model.update(num_gaussians=1, spectrum=False)
        c.loss.update(objective="l2", spectral_weight=0.0)
    if variant == "tiny":
        c.data.update(image_size=32, read="per_process", worker_count=0, prefetch=0)
        c.update(num_steps=20, batch_size=8, mesh=(-1, 1))
        c.sharding = base_config().sharding
        c.model.update(
            arch="",
            input_size=8,
            num_classes=10,
            patch_size=2,
            hidden_size=32,
            depth=1,
            num_heads=2,
            num_gaussians=2,
            logstd_inner_dim=16,
            dtype="float32",
            remat_policy="none",
            spectrum_base_size=(8, 8),
        )
        c.optim.update(warmup_steps=10, clip_start=0)
        c.checkpoint.every_steps = 10
        c.log.update(every_steps=1, sample_every_steps=0)
    return c
