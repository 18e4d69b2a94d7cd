"""A tiny class-conditional GM-DiT (K = 8, with SpectrumMLP) on the 8×8 scikit-learn digits.

The embedded default experiment: 2000 steps of batch 64 (0.76M parameters, ~0.16 s a step on 2 CPU
cores) train in about 6 minutes to recognisable digits (``<workdir>/samples/latest.png``, one class
per row; measured in bench/train_speed.py).

    python -m gmflow_jax.train --config digits_gmdit --workdir runs/digits

``get_config('tiny')`` is a 1-block GM-DiT (hidden 32 = 8 × 4, so FSDP splits it over 8 devices,
K = 2) that compiles in seconds: the tests' model.
"""

from __future__ import annotations

import ml_collections

from gmflow_jax.train.config import base_config

VARIANTS = ("default", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: None / 'default', or 'tiny'."""
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"digits_gmdit variant must be one of {VARIANTS}; got {arg!r}.")
    c = base_config()
    c.data.dataset = "digits"
    c.data.read = "device"  # small: held on device, no per-record Python cost
    c.num_steps = 2000
    c.batch_size = 64
    c.model.input_size = 8
    c.model.in_channels = 1
    c.model.num_classes = 10
    c.model.num_gaussians = 8
    c.model.patch_size = 2
    c.model.hidden_size = 96
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.logstd_inner_dim = 256
    c.model.spectrum = True
    c.model.spectrum_base_size = (8, 8)
    c.loss.trans_ratio = 0.5
    c.loss.t_mode = "logit_normal"
    c.loss.weight = 2.0
    c.optim.lr = 1e-3
    c.optim.b2 = 0.99
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 100
    c.optim.clip_norm = 1.0
    c.optim.clip_start = 0
    c.ema.max_nimg = 20_000.0
    c.checkpoint.every_steps = 1000
    c.log.every_steps = 100
    c.log.sample_every_steps = 1000
    if variant == "tiny":
        c.model.update(hidden_size=32, depth=1, num_heads=2, num_gaussians=2, logstd_inner_dim=16)
        c.batch_size = 16
        c.log.update(every_steps=1, sample_every_steps=0)
        c.data.prefetch = 0
    return c
