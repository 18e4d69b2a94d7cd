"""Sampling throughput of the toy GMFlow model and the share of a step spent outside the network.

    python bench/sampling_speed.py [--points 1000000] [--nfe 8] [--repeats 3]

Times GM-SDE 2 (K = 64) on ``--points`` 2-D points, compiled once, best of ``--repeats``,
and the same number of network evaluations alone (one ``lax.scan`` over the steps); the
difference is the GM arithmetic (guidance-free second-order update, sampling, transition).
Weights are random: the cost does not depend on them.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from common import machine, today
from flax import nnx

from gmflow_jax import solvers
from gmflow_jax.models.toy import ToyGMFlow


def best_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--nfe", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = ToyGMFlow(num_components=64, hidden=args.hidden, rngs=nnx.Rngs(0))
    noise = jax.random.normal(jax.random.PRNGKey(0), (args.points, 2), jnp.float32)
    key = jax.random.PRNGKey(1)

    sampler = jax.jit(lambda n, k: solvers.sample(model, n, key=k, solver="gm-sde", order=2, num_steps=args.nfe))

    @jax.jit
    def network_only(x, k):
        def body(x, tau):
            gm = model(x, jnp.full((x.shape[0],), tau))
            return x + 1e-3 * gm.means[:, 0], None  # keep a data dependence between steps

        return jax.lax.scan(body, x, 1000.0 * jnp.linspace(1.0, 0.1, args.nfe))[0]

    t_total = best_time(sampler, noise, key, repeats=args.repeats)
    t_net = best_time(network_only, noise, key, repeats=args.repeats)
    print(f"machine: {machine()}; date: {today()}")
    print("| points | NFE | sampler s | points/s | network-only s | share outside network |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.points:,} | {args.nfe} | {t_total:.2f} | {args.points / t_total:,.0f} | {t_net:.2f} "
        f"| {max(0.0, 1.0 - t_net / t_total):.0%} |"
    )


if __name__ == "__main__":
    main()
