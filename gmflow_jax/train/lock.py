"""One trainer per workdir: ``<workdir>/trainer.lock`` names the holder (host, pid, start time).

Process 0 creates the file atomically (``O_CREAT | O_EXCL``) and removes it when the run ends. A
lock left by a process that is gone (same host, pid not running: a kill -9 or a crash) is taken
over with a warning. A lock held from another host cannot be checked from here (shared or
network filesystems): the second trainer refuses, naming the holder and how to clear the lock.

On an object store (a ``gs://`` workdir) there is no ``O_EXCL``: process 0 writes the file only if
it finds none, waits ``SETTLE_S`` and reads it back; it holds the lock only if the file still names
it (of two trainers that both found no file, the one whose write landed last wins, the other
refuses). Two trainers can still both start if one takes longer than ``SETTLE_S`` between its
check and its write; docs/reliability.md says so.
"""

from __future__ import annotations

import json
import os
import socket
import time

from absl import logging

from gmflow_jax.checkpoint import is_url, workdir_path

LOCK_FILE = "trainer.lock"
SETTLE_S = 2.0  # object stores: wait this long after writing the lock before reading it back


class WorkdirLockedError(RuntimeError):
    """Another trainer holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir for this process (call on process 0 only)."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = workdir_path(workdir) / LOCK_FILE
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def _create(self) -> bool:
        if is_url(self.path):  # no O_EXCL: write if absent, then check that our write is the one that stayed
            if self.path.exists():
                return False
            self.path.write_text(json.dumps(self.info))
            time.sleep(SETTLE_S)
            return self._holder() == self.info
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)
        return True

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # being written, or unreadable: treated as held

    def acquire(self) -> None:
        """Takes the lock, or ``WorkdirLockedError`` naming the holder."""
        if self._create():
            return
        holder = self._holder()
        same_host = holder.get("host") == self.info["host"]
        if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            logging.warning(
                "taking over %s from pid %d (started %s), which is no longer running",
                self.path,
                holder["pid"],
                holder.get("started", "?"),
            )
            self.path.unlink()
            if self._create():
                return
            holder = self._holder()  # another trainer took it over first
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
        how = (
            "wait for it to finish or stop it"
            if holder.get("host") == self.info["host"]
            else "if that trainer is no longer running, delete the lock file"
        )
        raise WorkdirLockedError(f"workdir {self.path.parent} is in use by {who} ({self.path}); {how}.")

    def release(self) -> None:
        holder = self._holder()
        if holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
            self.path.unlink()

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
