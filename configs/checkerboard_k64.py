"""The 2-D checkerboard experiment of the paper (§5.1): ``ToyGMFlow`` with K = 64, λ = 0.9.

``get_config()`` is GMFlow (transition loss, uniform t, loss weight 1);
``get_config('baseline')`` the flow-matching baseline (K = 1, fixed unit std, L2 loss).

    python -m gmflow_jax.train --config configs/checkerboard_k64.py --workdir runs/cb
    python -m gmflow_jax.train --config configs/checkerboard_k64.py:baseline --workdir runs/cb_fm
"""

from __future__ import annotations

import ml_collections

from gmflow_jax.train_config import base_config, toy_model_config

VARIANTS = ("gmflow", "baseline")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: None / 'gmflow' (K = 64) or 'baseline' (L2 flow matching)."""
    variant = arg or "gmflow"
    if variant not in VARIANTS:
        raise ValueError(f"checkerboard_k64 variant must be one of {VARIANTS}; got {arg!r}.")
    c = base_config()
    c.data.dataset = "checkerboard"
    c.data.read = "device"  # small: held on device, no per-record Python cost
    c.num_steps = 20_000
    c.batch_size = 2048
    baseline = variant == "baseline"
    c.model = toy_model_config(num_gaussians=1 if baseline else 64, learn_std=not baseline)
    c.loss.objective = "l2" if baseline else "gm"
    c.loss.trans_ratio = 0.9
    c.loss.t_mode = "uniform"
    c.loss.weight = 1.0
    c.loss.spectral_weight = 0.0
    c.loss.label_dropout = 0.0
    c.optim.lr = 1e-3
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 0
    c.optim.clip_norm = 0.0
    c.ema.max_nimg = 2e6
    c.checkpoint.every_steps = 2000
    c.log.every_steps = 100
    c.log.sample_every_steps = 5000
    return c
