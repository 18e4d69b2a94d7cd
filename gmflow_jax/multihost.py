"""Multi-process helpers: ``jax.distributed`` start-up, barriers, agreement, process-0-first work.

Every helper is a no-op (or the plain single-process answer) when there is one JAX process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from absl import logging

T = TypeVar("T")


class DistributedInitError(RuntimeError):
    """``jax.distributed.initialize`` was asked for and failed."""


def initialize_distributed(
    *,
    multihost: bool,
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    timeout: int = 300,
) -> None:
    """``jax.distributed.initialize`` when asked (flags or ``multihost``); a failure is an error."""
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not (multihost or explicit):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout,
        )
    except Exception as e:
        raise DistributedInitError(
            f"jax.distributed.initialize failed (coordinator_address={coordinator_address!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}): {type(e).__name__}: {e}. "
            "Refusing to fall back to a single-host run."
        ) from e
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def barrier(name: str) -> None:
    """Waits until every JAX process reaches the barrier ``name``."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(ok: bool) -> bool:
    """True iff ``ok`` on every JAX process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def max_over_processes(value: int) -> int:
    """The largest of ``value`` over all JAX processes."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def any_process(flag: bool) -> bool:
    """True iff ``flag`` on some JAX process."""
    return not agree(not flag)


def primary_first(fn: Callable[[], T], name: str) -> T:
    """Runs ``fn`` on process 0, then (after a barrier) on the others: e.g. build a dataset once."""
    if jax.process_count() == 1:
        return fn()
    out = fn() if jax.process_index() == 0 else None
    barrier(name)
    return out if jax.process_index() == 0 else fn()
