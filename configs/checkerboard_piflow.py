"""A 1-NFE pi-Flow student of the 2-D checkerboard teacher (``checkerboard_k64``), as the authors' toy.

The student is the teacher's MLP (K = 64), started from its weights and trained by pi-ID
(docs/method.md §10) to imitate the teacher's velocity along its own policy's trajectories; it then
draws the checkerboard in one network evaluation (a 128-sub-step rollout of its GM policy). EMA: the
authors' pi-Flow power EMA (γ = 7, a copy of the weights up to step 400; docs/method.md §9).

    python -m gmflow_jax.train --config checkerboard_k64 --workdir runs/cb
    python -m gmflow_jax.train --config checkerboard_piflow --workdir runs/cb_piflow \\
        --config.distill.teacher=runs/cb

``get_config('tiny')``: the student of ``checkerboard_k64:tiny`` (the tests').
"""

from __future__ import annotations

import ml_collections

from gmflow_jax.train.config import load_config

VARIANTS = ("default", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``arg``: None / 'default', or 'tiny'."""
    variant = arg or "default"
    if variant not in VARIANTS:
        raise ValueError(f"checkerboard_piflow variant must be one of {VARIANTS}; got {arg!r}.")
    c = load_config("checkerboard_k64:tiny" if variant == "tiny" else "checkerboard_k64")
    c.num_steps = 20 if variant == "tiny" else 2000
    c.optim.update(lr=2e-4, decay_steps=0, warmup_steps=100 if variant == "default" else 0, clip_norm=1.0, clip_start=0)
    c.ema.update(kind="power", gamma=7.0, start_step=2 if variant == "tiny" else 400)
    c.checkpoint.every_steps = 10 if variant == "tiny" else 1000
    c.log.sample_every_steps = 0 if variant == "tiny" else 1000
    c.distill.update(
        teacher_config="checkerboard_k64:tiny" if variant == "tiny" else "checkerboard_k64",
        nfe=1,
        total_substeps=128,
        num_intermediate_states=2,
        gm_dropout=0.05,
        guidance=0.0,
        scale=3.0,
    )
    return c
