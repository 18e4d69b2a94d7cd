"""When a run may write into its workdir, and when it must stop: the lock's fence and the stop signals,
decided the same way on every JAX process.

Only process 0 holds ``<workdir>/trainer.lock`` (``train.lock.WorkdirLock``); ``Fence`` carries its answer to
all processes. Before every checkpoint save (a collective write) process 0 reads the lock and broadcasts
the verdict: save, skip (the lock cannot be read now), or stop (``LockLostError`` on every process, with
process 0's one line: who took the lock over, or that it is gone or ran out, and when it was last
renewed). Process 0's own writes (config, previews, events) ask ``may_write`` first. ``StopRequest``
turns SIGTERM / SIGINT into a save-and-stop and a lost lock into a stop without saving, at a step
boundary all processes agree on: every step in a single-process run; with several processes every
``preemption_check_every`` steps, or more often when those steps would take more than an eighth of the
lease (so every process stops within a quarter lease of process 0 noticing, plus one step).
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from gmflow_jax.train.lock import RETRIES_PER_LEASE, LockLostError, WorkdirLock

HOLDS, UNREADABLE, LOST = 0, 1, 2  # process 0's verdict on the lock
MESSAGE_BYTES = 1024  # process 0's one line, as broadcast to the others


def _from_process_0(code: int, message: str) -> tuple[int, str]:
    """Process 0's ``(code, message)`` on every process (one small collective; identity with one process)."""
    if jax.process_count() == 1:
        return code, message
    from jax.experimental import multihost_utils

    text = np.zeros(MESSAGE_BYTES, np.int32)
    raw = np.frombuffer(message.encode()[:MESSAGE_BYTES], np.uint8)
    text[: raw.size] = raw
    out = multihost_utils.broadcast_one_to_all({"code": np.int32(code), "text": text})
    message = bytes(np.asarray(out["text"], np.uint8)).rstrip(b"\0").decode(errors="replace")
    return int(out["code"]), message


def _gather(values: list[int]) -> np.ndarray:
    """``(processes, len(values))``: every process's ``values``."""
    if jax.process_count() == 1:
        return np.asarray([values], np.int64)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32))).reshape(-1, len(values))


class Fence:
    """The workdir's write permission for all processes; ``lock``: process 0's ``WorkdirLock`` (None elsewhere)."""

    def __init__(self, lock: WorkdirLock | None, lease_s: float):
        self.lock = lock
        self.lease_s = float(lease_s)

    def lost_here(self) -> bool:
        """Process 0: whether the lock is lost (no I/O unless the lease has run out); other processes: False."""
        if self.lock is None:
            return False
        if self.lock.lost is None and self.lock.time_left() <= 0:
            self.lock.holds()  # names who holds it now, if anyone
        return self.lock.lost is not None

    def stop(self) -> None:
        """Collective, once some process knows the lock is lost: ``LockLostError`` on all, with process 0's line."""
        _, message = _from_process_0(LOST, (self.lock.lost if self.lock is not None else None) or "")
        raise LockLostError(message or "process 0 lost the workdir's lock")

    def may_write(self, what: str) -> bool:
        """Process 0, before writing ``what`` into the workdir: whether the lock still names this run (a read)."""
        if self.lock is None:
            return True
        held = self.lock.holds()
        if held is None:
            logging.warning("%s not written: %s cannot be read now", what, self.lock.path)
        return bool(held)

    def may_save(self, step: int, *, last: bool) -> bool:
        """Collective, before saving ``step``: True to save; False to skip it (the lock cannot be read now;
        a ``last`` save, at the end or on a stop signal, retries within the lease first); ``LockLostError``
        on every process once the lock is lost."""
        code = HOLDS
        if self.lock is not None:
            held = self.lock.holds()
            while held is None and last and self.lock.time_left() > 0:
                time.sleep(min(self.lease_s / RETRIES_PER_LEASE, max(self.lock.time_left(), 0.0)))
                held = self.lock.holds()
            code = {True: HOLDS, None: UNREADABLE, False: LOST}[held]
        code, message = _from_process_0(code, (self.lock.lost if self.lock is not None else None) or "")
        if code == LOST:
            raise LockLostError(message)
        if code == UNREADABLE:
            where = self.lock.path if self.lock is not None else "the workdir's lock"
            logging.warning("checkpoint step %d not saved: %s cannot be read now (saves are fenced by it)", step, where)
        return code == HOLDS


class StopRequest:
    """SIGTERM / SIGINT → save and stop at the next step boundary; a second SIGINT interrupts at once;
    a lost lock → ``LockLostError`` at a step boundary, on every process."""

    def __init__(self, check_every: int, fence: Fence):
        self.requested = False
        self._check_every = check_every
        self._fence = fence
        self._previous: dict[int, Any] = {}
        self._next_check = 0
        self._since: tuple[int, float] | None = None  # (step, time) of the last agreement

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logging.warning(
            "received %s: saving a checkpoint at the current step, then exiting", signal.Signals(signum).name
        )

    def should_stop(self, step: int) -> bool:
        """Whether to stop (and save) after ``step``; ``LockLostError`` once the lock is lost. All processes
        agree (see the module docstring for how often they compare)."""
        if jax.process_count() == 1:
            if self._fence.lost_here():
                self._fence.stop()
            return self.requested
        if step < self._next_check:
            return False
        interval, now = 1, time.monotonic()  # until a step time is measured: every step
        if self._since is not None and step > self._since[0]:
            per_step = max((now - self._since[1]) / (step - self._since[0]), 1e-6)
            interval = max(1, min(self._check_every, int(self._fence.lease_s / 8 / per_step)))
        self._since = (step, now)
        votes = _gather([int(self.requested), int(self._fence.lost_here()), interval])
        if votes[:, 1].any():
            self._fence.stop()
        self._next_check = step + int(votes[:, 2].min())
        return bool(votes[:, 0].any())
