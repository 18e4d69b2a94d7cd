"""One trainer per workdir: ``<workdir>/trainer.lock`` names the holder (host, pid, start time).

Process 0 creates the file atomically (``O_CREAT | O_EXCL``) and removes it when the run ends. A
lock left by a process that is gone (same host, pid not running: a kill -9 or a crash) is taken
over with a warning. A lock held from another host cannot be checked from here (shared or
network filesystems): the second trainer refuses, naming the holder and how to clear the lock.
"""

from __future__ import annotations

import json
import os
import socket
import time

from absl import logging

LOCK_FILE = "trainer.lock"


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

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)
        return True

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
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
            os.remove(self.path)
            if self._create():
                return
            holder = self._holder()  # another trainer took it over first
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
        how = (
            "wait for it to finish or stop it"
            if holder.get("host") == self.info["host"]
            else "if that trainer is no longer running, delete the lock file"
        )
        raise WorkdirLockedError(f"workdir {os.path.dirname(self.path)} is in use by {who} ({self.path}); {how}.")

    def release(self) -> None:
        holder = self._holder()
        if holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
            os.remove(self.path)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
