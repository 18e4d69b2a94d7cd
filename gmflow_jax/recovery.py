"""How reading a checkpoint fails and recovers: the three kinds of failure, retries of transient I/O errors,
and the fall-back from a damaged step to the newest good one (the rules are in ``gmflow_jax.checkpoint``'s
docstring). Used by the trainer's restore, the ``Sampler`` and the distillation teacher.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from absl import logging

from gmflow_jax.multihost import max_over_processes
from gmflow_jax.storage import describe

TRANSIENT_MARKERS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "Connection reset", "Temporary failure", "timed out")
RETRY_DELAYS_S = (1.0, 4.0, 16.0)  # back-off before each retry of a transient read error


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be restored, or a requested checkpoint is missing or damaged."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint holds a different parameter tree than the config builds (nothing was changed)."""


class TransientCheckpointError(CheckpointError):
    """Reading failed with an I/O error that may pass, even after retries (nothing was changed)."""


def newest_good(
    steps: list[int],
    attempt: Callable[[int], Any],
    on_damaged: Callable[[int, str], None] | None = None,
    *,
    where: str,
    all_processes: bool = False,
) -> tuple[tuple[int, Any] | None, list[str]]:
    """Tries ``attempt(step)`` from the newest step down; returns ``((step, value) or None, problems)``.

    A step whose ``attempt`` raises is damaged: it is logged in one line, passed to
    ``on_damaged(step, reason)`` and the previous step is tried. ``IncompatibleCheckpointError`` and
    ``TransientCheckpointError`` are not damage: they stop the search at once. With ``all_processes``
    every JAX process takes the same decision (the worst outcome of any process).
    """
    ok, damaged, stop = 0, 1, 2
    problems = []
    for step in reversed(steps):
        value, problem, error, outcome = None, None, None, ok
        try:
            value = attempt(step)
        except (IncompatibleCheckpointError, TransientCheckpointError) as e:
            error, outcome = e, stop
        except Exception as e:  # any other failure to read a step makes it damaged
            problem, outcome = describe(e), damaged
        if all_processes:
            outcome = max_over_processes(outcome)
        if outcome == stop:
            raise error or CheckpointError(f"another process stopped restoring step {step} in {where}")
        if outcome == ok:
            return (step, value), problems
        problem = problem or "another process could not restore it"
        logging.warning("checkpoint step %d in %s is damaged (%s); trying the previous one", step, where, problem)
        problems.append(f"step {step}: {problem}")
        if on_damaged is not None:
            on_damaged(step, problem)
    return None, problems


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` looks like an I/O error that may pass (network storage hiccups)."""
    text = f"{e} {describe(e)}"
    return isinstance(e, TimeoutError | ConnectionError) or any(m in text for m in TRANSIENT_MARKERS)


def with_retries(fn: Callable[[int], Any], delays: tuple[float, ...] = RETRY_DELAYS_S) -> Callable[[int], Any]:
    """``fn(step)``, retried after each of ``delays`` seconds while it fails transiently; then
    ``TransientCheckpointError``. Other errors pass through at once."""

    def run(step: int) -> Any:
        for retry in range(len(delays) + 1):
            try:
                return fn(step)
            except CheckpointError:
                raise
            except Exception as e:
                if not is_transient(e):
                    raise
                if retry == len(delays):
                    raise TransientCheckpointError(
                        f"reading checkpoint step {step} failed {retry + 1} times ({describe(e)}); nothing was "
                        "changed: retry when the storage is reachable."
                    ) from e
                logging.warning("reading checkpoint step %d: %s; retrying in %g s", step, describe(e), delays[retry])
                time.sleep(delays[retry])
        raise AssertionError("unreachable")

    return run
