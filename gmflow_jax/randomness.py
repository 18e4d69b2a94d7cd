"""Per-example randomness: what makes a training step independent of how its batch is split.

The rule: every random draw of example ``i`` comes from ``fold_in(key, i)``, ``i`` the example's index in the
global batch, and then from a per-purpose key made from that one (``fold_in(·, tag)``, or the keys of a
``split``), never from a key shared by the batch. So a draw does not depend on the batch size, on how the
batch is laid over devices or on how it is cut into micro-batches. The GMFlow step (``train.step``) and
pi-Flow's losses (``piflow``) both draw through ``per_example``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def example_keys(key: jax.Array, index: jax.Array) -> jax.Array:
    """One key per example: ``fold_in(key, index[i])`` for the examples' global indices (N,) -> (N, ...)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index)


def per_example(keys: jax.Array, draw: Callable[..., Any], *rows: jax.Array, tag: int | None = None) -> Any:
    """``draw(key_i, *row_i)`` for every example ``i``, stacked to (N, ...): ``key_i`` is ``fold_in(keys[i], tag)``
    (``keys[i]`` itself for ``tag=None``), ``row_i`` the example's rows of ``rows`` (each (N, ...)). The draw
    of example ``i`` depends on its own key and rows only."""
    return jax.vmap(lambda k, *r: draw(k if tag is None else jax.random.fold_in(k, tag), *r))(keys, *rows)
