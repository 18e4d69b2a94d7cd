"""A compact jitted training loop for the 2-D toy model (GMFlow or the L2 baseline).

Temporary: the sharded trainer (``gmflow_jax.train``) takes this experiment over.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gmflow_jax.flow import diffuse
from gmflow_jax.losses import l2_flow_loss, sample_t, transition_nll, transition_pair
from gmflow_jax.models.toy import ToyGMFlow


def toy_loss(model: ToyGMFlow, x0: jax.Array, key: jax.Array, objective: str, trans_ratio: float) -> jax.Array:
    """Mean loss over a batch x0 (B, C): 'gm' (transition loss) or 'l2' (flow matching)."""
    k_t, k_x = jax.random.split(key)
    t = sample_t(k_t, x0.shape[0])
    if objective == "gm":
        x_t, x_lo, t_lo = transition_pair(k_x, x0, t, trans_ratio)
        return jnp.mean(transition_nll(model(x_t, 1000.0 * t), x_t, t, x_lo, t_lo))
    eps = jax.random.normal(k_x, x0.shape, jnp.float32)
    x_t = diffuse(x0, eps, t)
    return jnp.mean(l2_flow_loss(model(x_t, 1000.0 * t).means[:, 0], eps - x0))


def train_toy(
    model: ToyGMFlow,
    data: np.ndarray,
    *,
    objective: str,
    steps: int,
    batch_size: int = 2048,
    lr: float = 1e-3,
    trans_ratio: float = 0.9,
    ema_decay: float = 0.999,
    seed: int = 0,
    chunk: int = 250,
    log: Callable[[str], None] = print,
) -> tuple[ToyGMFlow, list[float]]:
    """Trains on random rows of ``data (M, C)``; returns the EMA model and the loss per chunk."""
    if objective not in ("gm", "l2"):
        raise ValueError(f"objective must be 'gm' or 'l2'; got {objective!r}.")
    if steps % chunk:
        raise ValueError(f"steps ({steps}) must be a multiple of chunk ({chunk}).")
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))
    graphdef, params = nnx.split(model, nnx.Param)
    data = jnp.asarray(data, jnp.float32)

    @jax.jit
    def run_chunk(params, ema, opt_state, key):
        def one(carry, k):
            params, ema, opt_state = carry
            k_b, k_l = jax.random.split(k)
            x0 = data[jax.random.randint(k_b, (batch_size,), 0, data.shape[0])]
            loss, grads = jax.value_and_grad(
                lambda p: toy_loss(nnx.merge(graphdef, p), x0, k_l, objective, trans_ratio)
            )(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
            return (params, ema, opt_state), loss

        (params, ema, opt_state), losses = jax.lax.scan(one, (params, ema, opt_state), jax.random.split(key, chunk))
        return params, ema, opt_state, jnp.mean(losses)

    ema, opt_state, key = params, opt.init(params), jax.random.PRNGKey(seed)
    history, start = [], time.perf_counter()
    for i in range(steps // chunk):
        params, ema, opt_state, loss = run_chunk(params, ema, opt_state, jax.random.fold_in(key, i))
        history.append(float(loss))
        done = (i + 1) * chunk
        rate = done / (time.perf_counter() - start)
        eta = (steps - done) / rate
        log(f"[{objective}] step {done}/{steps} loss {history[-1]:.4f} ({rate:.0f} steps/s, ETA {eta:.0f}s)")
    return nnx.merge(graphdef, ema), history
