"""One trainer per workdir: ``<workdir>/trainer.lock`` names the holder and carries its lease.

Process 0 creates the file atomically (``O_CREAT | O_EXCL``), renews it every quarter of the lease
period from a background thread (a heartbeat: the ``beat`` count goes up), and removes it when the
run ends. A second trainer that finds the lock decides from what it can observe:

* same host, pid not running (a kill -9 or a crash): taken over at once, with a warning;
* same host, pid running: refused (a live trainer's lock is never taken);
* another host (a restart on new VMs, another machine on a shared disk), or this process's own pid
  (a container restarted under the same host name): the lock is watched for one lease period.
  Renewed: its holder is alive, refused in one line naming it. Not renewed: its holder is gone;
  taken over with a warning naming it. Only a change of the file counts, never a comparison of
  clocks, so clock skew between hosts does not matter.

On an object store (a ``gs://`` workdir) there is no ``O_EXCL``: process 0 writes the file only if
it finds none, waits ``SETTLE_S`` and reads it back; it holds the lock only if the file still names
it (of two trainers that both found no file, the one whose write landed last wins, the other
refuses). docs/reliability.md gives the timing and the limits.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from gmflow_jax.storage import describe, is_url, workdir_path, write_atomic

LOCK_FILE = "trainer.lock"
SETTLE_S = 2.0  # object stores: wait this long after writing the lock before reading it back
DEFAULT_LEASE_S = 600.0
RENEWALS_PER_LEASE = 4  # the holder renews every lease/4: a watcher of one lease sees several renewals


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


def _who(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"


class WorkdirLock:
    """``with WorkdirLock(workdir, lease_s):`` holds the workdir for this process (call on process 0 only).

    ``lease_s``: seconds within which a live holder always renews the lock (it renews every
    ``lease_s / 4``); another host's lock that is not renewed for one lease is taken over.
    """

    def __init__(self, workdir: str | os.PathLike, lease_s: float = DEFAULT_LEASE_S):
        if not lease_s > 0:
            raise ValueError(f"lock lease {lease_s!r} s: expected a positive number of seconds")
        self.path = workdir_path(workdir) / LOCK_FILE
        self.lease_s = float(lease_s)
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "token": uuid.uuid4().hex,
            "lease_s": self.lease_s,
            "beat": 0,
        }
        self.lost: dict | None = None  # the holder that took the lock from this one (its heartbeat had stalled)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _create(self) -> bool:
        if is_url(self.path):  # no O_EXCL: write if absent, then check that our write is the one that stayed
            if self.path.exists():
                return False
            self.path.write_text(json.dumps(self.info))
            time.sleep(SETTLE_S)
            return self._holder().get("token") == self.info["token"]
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.info, f)
        return True

    def _read(self) -> str | None:
        """The lock file's text; ``None`` if there is none; ``''`` if unreadable (e.g. being written)."""
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return ""

    def _holder(self) -> dict:
        try:
            holder = json.loads(self._read() or "")
        except ValueError:
            return {}  # being written, or unreadable: treated as held
        return holder if isinstance(holder, dict) else {}

    def _holder_is_gone(self, holder: dict) -> bool:
        """Whether the lock's holder is no longer running (see the module docstring)."""
        pid = holder.get("pid")
        if holder.get("host") == self.info["host"] and isinstance(pid, int) and pid != self.info["pid"]:
            return not _alive(pid)  # (our own pid, as in a restarted container, tells nothing: watched)
        lease = holder.get("lease_s")
        lease = float(lease) if isinstance(lease, int | float) and lease > 0 else self.lease_s
        logging.warning(
            "%s is held by %s; watching it for up to %.0f s (one lease): if it is not "
            "renewed, its trainer is gone and this run takes over.",
            self.path,
            _who(holder),
            lease,
        )
        text, deadline = self._read(), time.monotonic() + lease
        while time.monotonic() < deadline:
            time.sleep(min(max(lease / 20, 0.05), 15.0, max(deadline - time.monotonic(), 0.0)))
            now = self._read()
            if now is None:
                return True  # released meanwhile: free to take
            if now != text:
                return False  # renewed (or replaced): someone is alive
        return self._read() == text

    def acquire(self) -> None:
        """Takes the lock, or ``WorkdirLockedError`` naming the holder; then renews it until ``release``."""
        if not self._create():
            holder = self._holder()
            if not self._holder_is_gone(holder):
                raise WorkdirLockedError(self._refusal(self._holder() or holder))
            logging.warning("taking over %s from %s, which is no longer running", self.path, _who(holder))
            self.path.unlink(missing_ok=True)
            if not self._create():
                raise WorkdirLockedError(self._refusal(self._holder()))  # another trainer took it over first
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew, name="trainer.lock heartbeat", daemon=True)
        self._heartbeat.start()

    def _refusal(self, holder: dict) -> str:
        if holder.get("host") == self.info["host"]:
            how = "wait for it to finish or stop it"
        else:
            how = f"its lease ({holder.get('lease_s', self.lease_s):g} s) is being renewed: wait for it or stop it"
        return f"workdir {self.path.parent} is in use by {_who(holder)} ({self.path}); {how}."

    def _renew(self) -> None:
        """The heartbeat: rewrites the lock with ``beat`` + 1 every lease/4 while it still names this trainer."""
        while not self._stop.wait(self.lease_s / RENEWALS_PER_LEASE):
            holder = self._holder()
            if holder and holder.get("token") != self.info["token"]:
                self.lost = holder
                logging.error(
                    "%s was taken over by %s: this trainer's lease was not renewed for a whole lease period "
                    "(a stalled process or storage); stop this run.",
                    self.path,
                    _who(holder),
                )
                return
            self.info["beat"] += 1
            try:
                write_atomic(self.path, json.dumps(self.info))
            except Exception as e:  # a transient storage error: the next beat tries again
                logging.warning("could not renew %s: %s", self.path, describe(e))

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self._holder().get("token") == self.info["token"]:
            self.path.unlink()

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
