"""The 2-D checkerboard experiment of the paper (§5.1): ``ToyGMFlow`` with K = 64, λ = 0.9.

``get_config()`` is GMFlow (transition loss, uniform t, loss weight 1);
``get_config('baseline')`` the flow-matching baseline (K = 1, fixed unit std, L2 loss);
``get_config('tiny')`` a small GMFlow MLP on 64K points (compiles in seconds, ~100 steps/s on
one core: the tests' model).

Both use the budget of ``bench/checkerboard.py``, which trains them through this trainer: an MLP of
5 hidden layers of 256, 10 000 steps × batch 1024 on the 2**20-point dataset (held on the device),
Adam (AdamW with no weight decay) at 1e-3 with a cosine decay to 1e-5 over the run (no warm-up),
no clipping, and an EMA of the weights whose ``ema_nimg`` grows with the
images seen up to a half-life of ~693 steps, i.e. β = 0.999 a step (method.md §9; reached at step ~6900).

    python -m gmflow_jax.train --config checkerboard_k64 --workdir runs/cb
    python -m gmflow_jax.train --config checkerboard_k64:baseline --workdir runs/cb_fm
"""

from __future__ import annotations

import math

import ml_collections

from gmflow_jax.train.config import base_config, toy_model_config

VARIANTS = ("gmflow", "baseline", "tiny")
BATCH_SIZE = 1024
EMA_DECAY = 0.999  # per step, once the ramp is over


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: None / 'gmflow' (K = 64), 'baseline' (L2 flow matching) or 'tiny'."""
    variant = arg or "gmflow"
    if variant not in VARIANTS:
        raise ValueError(f"checkerboard_k64 variant must be one of {VARIANTS}; got {arg!r}.")
    c = base_config()
    c.data.dataset = "checkerboard"
    c.data.read = "device"  # small: held on device, no per-record Python cost
    c.num_steps = 10_000
    c.batch_size = BATCH_SIZE
    baseline = variant == "baseline"
    c.model = toy_model_config(num_gaussians=1 if baseline else 64, learn_std=not baseline)
    c.model.hidden = 256
    c.model.num_layers = 5
    c.loss.objective = "l2" if baseline else "gm"
    c.loss.trans_ratio = 0.9
    c.loss.t_mode = "uniform"
    c.loss.weight = 1.0
    c.loss.spectral_weight = 0.0
    c.loss.label_dropout = 0.0
    c.optim.lr = 1e-3
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 0
    c.optim.decay_steps = c.num_steps  # cosine decay to 1 % of lr; set it again if num_steps changes
    c.optim.final_lr_factor = 0.01
    c.optim.clip_norm = 0.0
    # β = 0.5 ** (batch / ema_nimg) = EMA_DECAY  <=>  ema_nimg = batch · ln 0.5 / ln EMA_DECAY (~709 000 points).
    c.ema.max_nimg = float(round(BATCH_SIZE * math.log(0.5) / math.log(EMA_DECAY)))
    c.ema.ratio = 0.1
    c.checkpoint.every_steps = 2000
    c.log.every_steps = 100
    c.log.sample_every_steps = 5000
    if variant == "tiny":
        c.data.update(dataset="checkerboard/64k", read="per_process", prefetch=0)
        c.model.update(hidden=32, num_layers=2, num_freqs=4)
        c.batch_size = 64
        c.log.update(every_steps=5, progress_every_steps=10, sample_every_steps=0)
    return c
