"""A tiny class-conditional GM-DiT (K = 8, with SpectrumMLP) on the 8×8 scikit-learn digits.

The embedded default experiment: 2000 steps of batch 64 (0.76M parameters, ~0.16 s a step on 2 CPU
cores) train in about 6 minutes to recognisable digits (``<workdir>/samples/latest.png``, one class
per row; measured in bench/train_speed.py).

    python -m gmflow_jax.train --config configs/digits_gmdit.py --workdir runs/digits
"""

from __future__ import annotations

import ml_collections

from gmflow_jax.train_config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: unused (kept for the ``get_config(arg)`` convention)."""
    del arg
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
    return c
