"""``config.ema.kind = 'power'`` (method.md §9): the pi-Flow recipes' power EMA, against a float64 NumPy
recurrence of ``ema ← net + β (ema − net)``, ``β = (1 − 1/t)^(γ+1)``, ``t = max(iter + 1 − start, 1)``,
replayed over the weights of every step of the trainer's step function. (Resuming across ``start_step``
bit-exactly: ``digits_piflow:tiny``, start_step 2, in tests/integration/test_distill_cli.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmflow_jax.sharding import make_mesh
from gmflow_jax.train.config import load_config, validate_config
from gmflow_jax.train.state import ema_beta, ema_beta_for, init_state, power_ema_beta, setup_state
from gmflow_jax.train.step import make_train_step


def beta64(iteration: int, gamma: float, start: int) -> float:
    """The authors' ``karras`` momentum at ``runner.iter = iteration`` (float64)."""
    t = max(iteration + 1 - start, 1)
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def test_power_beta_is_the_formula():
    for step in (0, 1, 399, 400, 401, 402, 1000, 139_999):
        assert float(power_ema_beta(step, 7.0, 400)) == pytest.approx(beta64(step, 7.0, 400), rel=1e-6, abs=1e-12)
    assert float(power_ema_beta(400, 7.0, 400)) == 0.0  # still a copy at step = start_step
    assert float(power_ema_beta(401, 7.0, 400)) == pytest.approx(0.5**8, rel=1e-6)


def test_config_kind_selects_the_rule():
    c = load_config("imagenet_piflow_k32")
    assert (c.ema.kind, c.ema.gamma, c.ema.start_step) == ("power", 7.0, 400)
    assert float(ema_beta_for(1000, c.batch_size, c.ema)) == pytest.approx(beta64(1000, 7.0, 400), rel=1e-6)
    base = load_config("imagenet_gmdit_k8")
    assert base.ema.kind == "rampup"
    assert float(ema_beta_for(9, 256, base.ema)) == float(ema_beta(9, 256, base.ema.max_nimg, base.ema.ratio))
    for name in ("digits_piflow", "checkerboard_piflow"):
        assert load_config(name).ema.kind == "power", name


@pytest.mark.parametrize("field,value", [("kind", "karras"), ("gamma", -1.0), ("start_step", -1)])
def test_bad_ema_settings_are_refused(field, value):
    c = load_config("checkerboard_k64:tiny")
    with c.unlocked():
        c.ema[field] = value
    with pytest.raises(ValueError, match=rf"config\.ema\.{field}"):
        validate_config(c)


def test_the_train_step_keeps_the_power_ema_of_its_weights():
    """6 steps of the trainer's step (checkerboard MLP, lr 1e-2), start_step 2, γ = 1 (a large β, so that the
    EMA visibly lags): every step's EMA is the float64 replay of the recurrence from every step's weights;
    counting ``iter`` one later (after the optimizer step) would not be."""
    gamma, start, steps = 1.0, 2, 6
    c = load_config("checkerboard_k64:tiny")
    c.model.hidden, c.model.num_layers, c.model.num_freqs = 16, 1, 2
    c.optim.update(warmup_steps=0, lr=1e-2)
    c.ema.update(kind="power", gamma=gamma, start_step=start)
    setup = setup_state(c, make_mesh((-1, 1)))
    step = jax.jit(make_train_step(setup.graphdef, setup.tx, setup.schedule, c))
    rng = np.random.default_rng(0)
    state = init_state(setup, seed=0)
    leaves, emas = {}, {}
    for s in range(1, steps + 1):  # state s = after iteration s − 1
        batch = {
            "image": jnp.asarray(rng.uniform(-1, 1, (c.batch_size, 2)), jnp.float32),
            "label": jnp.zeros((c.batch_size,), jnp.int32),
        }
        state, metrics = step(state, batch)
        assert float(metrics["ema_beta"]) == pytest.approx(beta64(s - 1, gamma, start), rel=1e-6, abs=1e-12)
        leaves[s] = [np.asarray(a, np.float64) for a in jax.tree.leaves(state.params)]
        emas[s] = [np.asarray(a, np.float64) for a in jax.tree.leaves(state.ema)]

    def replay(offset: int) -> dict[int, list[np.ndarray]]:
        ema = {1: leaves[1]}  # iteration 0 < start: a copy of the weights after the first optimizer step
        for s in range(2, steps + 1):
            b = beta64(s - 1 + offset, gamma, start)
            ema[s] = [p + b * (e - p) for p, e in zip(leaves[s], ema[s - 1], strict=True)]
        return ema

    def dist(a, b) -> float:
        return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))

    exact, late = replay(0), replay(1)
    scale = max(float(np.abs(a).max()) for a in leaves[steps])
    for s in range(1, steps + 1):
        assert dist(emas[s], exact[s]) < 1e-6 * scale, (s, dist(emas[s], exact[s]))
    assert dist(emas[start + 1], leaves[start + 1]) == 0.0  # β = 0 up to iteration start_step: a copy
    lag, off = dist(emas[steps], leaves[steps]), dist(exact[steps], late[steps])
    assert lag > 1e-3 * scale and off > 1e-4 * scale, (lag, off)  # the test tells both apart
