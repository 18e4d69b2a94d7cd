"""A pi-Flow student of the ``make demo`` teacher (``digits_gmdit``): 1 or 2 network evaluations.

pi-ID (docs/method.md §10): the student is the teacher's GM-DiT trunk with 32 Gaussians, started
from the teacher's weights (its GM head tiled), trained to imitate the teacher's guided velocity
(probabilistic guidance w̃ = 0.3, the demo's) along its own policy's trajectories. EMA: the authors'
pi-Flow power EMA (γ = 7, a copy of the weights up to step 400; docs/method.md §9).

    python -m gmflow_jax.train --config digits_piflow --workdir runs/digits_piflow_1 \\
        --config.distill.teacher=results/digits_demo
    python -m gmflow_jax.train --config digits_piflow:2 --workdir runs/digits_piflow_2 \\
        --config.distill.teacher=results/digits_demo

``get_config(arg)``: ``'1'`` (default) or ``'2'`` network evaluations; ``'tiny'`` (1 NFE) is the tests'
student of ``digits_gmdit:tiny``.
"""

from __future__ import annotations

import ml_collections

from gmflow_jax.train.config import load_config

VARIANTS = ("1", "2", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: None / '1', '2', or 'tiny'."""
    variant = arg or "1"
    if variant not in VARIANTS:
        raise ValueError(f"digits_piflow variant must be one of {VARIANTS}; got {arg!r}.")
    c = load_config("digits_gmdit:tiny" if variant == "tiny" else "digits_gmdit")
    c.model.num_gaussians = 8 if variant == "tiny" else 32
    c.model.spectrum = False
    c.num_steps = 1000
    c.optim.update(lr=2e-4, b2=0.95, warmup_steps=50, clip_norm=1.0, clip_start=0, weight_decay=0.0)
    c.ema.update(kind="power", gamma=7.0, start_step=400)
    c.log.sample_every_steps = 500
    c.checkpoint.every_steps = 500
    c.distill.update(
        nfe=1 if variant in ("1", "tiny") else 2,
        teacher_config="digits_gmdit:tiny" if variant == "tiny" else "digits_gmdit",
        total_substeps=128,
        num_intermediate_states=2,
        gm_dropout=0.05,
        guidance=0.3,
        guidance_interval=(0.0, 1.0),
        orthogonal=1.0,
        scale=3.0,
    )
    if variant == "tiny":
        c.num_steps = 20
        c.ema.start_step = 2  # the resume tests cross it
        c.log.sample_every_steps = 0
        c.checkpoint.every_steps = 10
    return c
