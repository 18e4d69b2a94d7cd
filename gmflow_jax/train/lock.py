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

The holder's side (fencing): the lease counts on the holder's own clock from its last successful
write of the lock. ``holds()`` reads the lock and says whether it still names this trainer within its
lease; once the lock names another trainer, is gone, or the lease has run out (no renewal for a whole
lease: the process or its storage stalled), the lock is lost for good (``lost`` says why, in one line)
and this trainer never writes or deletes the lock again. A renewal is written only with at least a
quarter lease left, so it cannot land on a lock that a watcher has already taken over.
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
RETRIES_PER_LEASE = 16  # after a failed read or renewal, the holder tries again every lease/16


class WorkdirLockedError(RuntimeError):
    """Another trainer holds the workdir."""


class LockLostError(WorkdirLockedError):
    """This trainer no longer holds its workdir: its lock was taken over or removed, or its lease ran out."""


def _clock() -> float:
    """Seconds on a clock that also runs while the machine is suspended (Linux ``CLOCK_BOOTTIME``): a stall counts."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.monotonic() if boottime is None else time.clock_gettime(boottime)


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
        self.lost: str | None = None  # why this trainer no longer holds the lock (one line); final
        self.taken_by: dict | None = None  # the trainer that took the lock over, if that is why
        self._renewed = -float("inf")  # _clock() just before our last successful write of the lock
        self._renewed_at = "never"  # the same as a time of day, for messages
        self._problem = ""  # the last read or write error
        self._mutex = threading.Lock()  # one reader or writer of the lock at a time (heartbeat, saves, release)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _write(self) -> bool:
        """Writes ``info`` over the lock (holder only); on success the lease counts from just before the write."""
        t, at = _clock(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
        try:
            write_atomic(self.path, json.dumps(self.info))
        except Exception as e:  # a transient storage error: the heartbeat tries again
            self._problem = describe(e)
            logging.warning("could not renew %s: %s", self.path, self._problem)
            return False
        self._renewed, self._renewed_at = t, at
        return True

    def _create(self) -> bool:
        t, at = _clock(), time.strftime("%Y-%m-%d %H:%M:%S %Z")  # the lease counts from just before the write
        if is_url(self.path):  # no O_EXCL: write if absent, then check that our write is the one that stayed
            if self.path.exists():
                return False
            self.path.write_text(json.dumps(self.info))
            time.sleep(SETTLE_S)
            if self._holder().get("token") != self.info["token"]:
                return False
        else:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
        self._renewed, self._renewed_at = t, at
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

    def time_left(self) -> float:
        """Seconds until this trainer's lease runs out on its own clock (≤ 0: it has; a lost lock stays lost)."""
        return self.lease_s - (_clock() - self._renewed)

    def holds(self) -> bool | None:
        """Reads the lock: True while it names this trainer within its lease; False once lost (``lost`` says
        why; final); None when it cannot be read now (storage unreachable: ask again, within the lease)."""
        with self._mutex:
            return self._holds()

    def _holds(self) -> bool | None:
        if self.lost is not None:
            return False
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            text = None
        except Exception as e:  # gcsfs and the OS raise many types
            text, self._problem = "", describe(e)
        try:
            holder = json.loads(text) if text else None
        except ValueError:
            holder, self._problem = None, f"not a lock file: {text[:80]!r}"
        if text is None:
            self.lost = (
                f"{self.path} is gone: it was removed while this trainer held it (lease last renewed at "
                f"{self._renewed_at}). Stopped without saving; start the run again to resume."
            )
        elif isinstance(holder, dict) and holder.get("token") != self.info["token"]:
            self.taken_by = holder
            self.lost = (
                f"{self.path} was taken over by {_who(holder)}: this trainer's lease was last renewed at "
                f"{self._renewed_at} (lease {self.lease_s:g} s; its process or storage stalled). Stopped without "
                "saving; the new holder carries on."
            )
        elif self.time_left() <= 0:
            how = "" if isinstance(holder, dict) else f" (it could not be read: {self._problem})"
            self.lost = (
                f"this trainer's lease on {self.path} ran out: it was last renewed at {self._renewed_at}, more than "
                f"a lease ({self.lease_s:g} s) ago{how}, so another trainer may take the workdir over. Stopped "
                "without saving; start the run again to resume."
            )
        elif not isinstance(holder, dict):
            return None
        return self.lost is None

    def _renew(self) -> None:
        """The heartbeat: rewrites the lock with ``beat`` + 1 every lease/4 while it still names this trainer
        (every lease/16 after a failure); stops once the lock is lost."""
        wait = self.lease_s / RENEWALS_PER_LEASE
        while not self._stop.wait(wait):
            with self._mutex:
                held = self._holds()
                if held is False:
                    logging.error("%s", self.lost)
                    return
                renewed = False
                if held and self.time_left() > self.lease_s / RENEWALS_PER_LEASE:  # never a late write
                    self.info["beat"] += 1
                    renewed = self._write()
                elif held:
                    logging.warning("not renewing %s: too little of its lease is left to write it safely", self.path)
                else:
                    logging.warning(
                        "could not read %s (%s); trying again, the run stops if its lease (%.0f s left) runs out",
                        self.path,
                        self._problem,
                        max(self.time_left(), 0.0),
                    )
            wait = self.lease_s / (RENEWALS_PER_LEASE if renewed else RETRIES_PER_LEASE)

    def release(self) -> None:
        """Stops the heartbeat; removes the lock only if it still names this trainer within its lease."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        with self._mutex:
            if self._holds():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
