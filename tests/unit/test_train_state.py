"""Train state pieces (``gmflow_jax.train.state``): EMA rate, LR schedule, clipping from a step, decay mask."""

from __future__ import annotations

import math

import pytest


def test_ema_formula_and_warmup():
    import ml_collections

    from gmflow_jax.train.state import ema_beta, make_optimizer

    beta = float(ema_beta(9, 256, 30e6, 0.05))  # images_seen = 2560, ema_nimg = 128
    assert beta == pytest.approx(0.5 ** (256 / 128))
    assert float(ema_beta(10**9, 4096, 30e6, 0.05)) == pytest.approx(0.5 ** (4096 / 30e6))
    ocfg = ml_collections.ConfigDict(
        dict(
            lr=2e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, warmup_steps=1000, warmup_init_factor=1e-3,
            decay_steps=0, final_lr_factor=0.01, clip_norm=10.0, clip_start=1000,
        )
    )  # fmt: skip
    _, schedule = make_optimizer(ocfg)
    assert float(schedule(0)) == pytest.approx(2e-7, rel=1e-5)
    assert float(schedule(500)) == pytest.approx(2e-4 * (1e-3 + 0.5 * (1 - 1e-3)), rel=1e-5)
    assert float(schedule(5000)) == pytest.approx(2e-4, rel=1e-5)
    # cosine decay after the warm-up: lr (f + (1 − f)(1 + cos(π k / K)) / 2), k steps after the warm-up
    ocfg.decay_steps = 4000
    _, schedule = make_optimizer(ocfg)
    for k in (0, 1000, 2000, 4000, 6000):
        expected = 2e-4 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(k, 4000) / 4000)))
        assert float(schedule(1000 + k)) == pytest.approx(expected, rel=1e-5)


def test_clipping_starts_at_clip_start_and_no_decay_on_biases():
    import jax.numpy as jnp

    from gmflow_jax.train.state import clip_by_global_norm_from, decay_mask

    tx = clip_by_global_norm_from(1.0, 2)
    g = {"w": jnp.full((4,), 10.0)}
    s = tx.init(g)
    for step in range(3):
        u, s = tx.update(g, s)
        norm = float(jnp.linalg.norm(u["w"]))
        assert norm == pytest.approx(20.0 if step < 2 else 1.0, rel=1e-5)
    mask = decay_mask({"net": {"fc": {"kernel": 0, "bias": 0}, "emb": {"embedding": 0}}})
    assert mask == {"net": {"fc": {"kernel": True, "bias": False}, "emb": {"embedding": True}}}
