"""One trainer per workdir (``gmflow_jax.train.lock``): a lease renewed by the holder, watched by others.

"Another host" is real where the machine allows it: a holder started under ``unshare --uts`` with its
own host name (root on Linux), else skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from gmflow_jax.train.lock import LOCK_FILE, WorkdirLock, WorkdirLockedError

LEASE = 1.0  # s: short, so a watch takes a second


def test_second_holder_is_refused_naming_the_first(tmp_path):
    with WorkdirLock(str(tmp_path), LEASE) as held:
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["token"] == held.info["token"] and holder["lease_s"] == LEASE
        # the same pid tells nothing (a restarted container reuses it): watched, and renewed by the holder
        with pytest.raises(WorkdirLockedError, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}"):
            WorkdirLock(str(tmp_path), LEASE).acquire()
    assert not (tmp_path / LOCK_FILE).exists()  # released


def test_holder_renews_its_lease(tmp_path):
    with WorkdirLock(str(tmp_path), 0.2):
        beats = [json.loads((tmp_path / LOCK_FILE).read_text())["beat"]]
        for _ in range(3):
            time.sleep(0.15)
            beats.append(json.loads((tmp_path / LOCK_FILE).read_text())["beat"])
    assert beats == sorted(beats) and beats[-1] >= 2, beats


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    info = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "earlier"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(info))
    t0 = time.monotonic()
    with WorkdirLock(str(tmp_path), 600):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert time.monotonic() - t0 < 5  # no lease watched


def test_live_process_on_this_host_is_refused_at_once(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = {"host": socket.gethostname(), "pid": live.pid, "started": "earlier"}
        (tmp_path / LOCK_FILE).write_text(json.dumps(info))
        with pytest.raises(WorkdirLockedError, match=f"pid {live.pid} .*wait for it to finish or stop it"):
            WorkdirLock(str(tmp_path), 600).acquire()
        assert json.loads((tmp_path / LOCK_FILE).read_text()) == info  # untouched
    finally:
        live.kill()


def test_unrenewed_lock_from_another_host_is_taken_over_after_one_lease(tmp_path, caplog):
    info = {"host": "some-other-host", "pid": 1, "started": "earlier", "lease_s": LEASE, "beat": 3}
    (tmp_path / LOCK_FILE).write_text(json.dumps(info))
    t0 = time.monotonic()
    with WorkdirLock(str(tmp_path), 600):  # the holder's lease is the one watched
        waited = time.monotonic() - t0
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert LEASE <= waited < LEASE + 2, waited
    assert "taking over" in caplog.text and "pid 1 on some-other-host since earlier" in caplog.text


def test_lock_from_another_host_without_a_lease_is_watched_for_ours(tmp_path):
    info = {"host": "some-other-host", "pid": 1, "started": "earlier"}  # an older version's lock
    (tmp_path / LOCK_FILE).write_text(json.dumps(info))
    t0 = time.monotonic()
    WorkdirLock(str(tmp_path), 0.5).acquire()
    assert 0.5 <= time.monotonic() - t0 < 3


def test_taken_over_holder_stops_renewing_and_leaves_the_new_lock(tmp_path):
    held = WorkdirLock(str(tmp_path), 0.2)
    held.acquire()
    new = {"host": "new-vm", "pid": 9, "started": "now", "token": "other"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(new))  # as if its heartbeat had stalled for a lease
    time.sleep(0.3)
    assert held.taken_by == new and held.holds() is False
    assert re.search(r"taken over by pid 9 on new-vm since now: .*last renewed at \d{4}-\d\d-\d\d \d\d:", held.lost)
    held.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == new


@pytest.fixture
def other_host():
    """A command prefix that runs a process under the host name ``other-vm`` (``unshare --uts``)."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--uts", "hostname", "other-vm"], capture_output=True).returncode:
        pytest.skip("cannot run a process under another host name here (needs unshare --uts as root)")
    return lambda cmd: [unshare, "--uts", "sh", "-c", 'hostname other-vm && exec "$@"', "sh", *cmd]


def test_live_holder_on_another_host_is_refused_and_taken_over_once_killed(tmp_path, other_host, caplog):
    holder = f"""
import sys, time
from gmflow_jax.train.lock import WorkdirLock
WorkdirLock({str(tmp_path)!r}, {LEASE}).acquire()
print("held", flush=True)
time.sleep(120)
"""
    proc = subprocess.Popen(other_host([sys.executable, "-c", holder]), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "other-vm"
        t0 = time.monotonic()
        with pytest.raises(WorkdirLockedError, match=r"in use by pid \d+ on other-vm .*lease \(1 s\) is being renewed"):
            WorkdirLock(str(tmp_path), 600).acquire()
        assert time.monotonic() - t0 < LEASE + 1  # a renewal seen within the lease
        proc.send_signal(signal.SIGKILL)  # a preemption without grace: the lock stays behind
        proc.wait()
        t0 = time.monotonic()
        with WorkdirLock(str(tmp_path), 600):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == socket.gethostname()
        assert LEASE <= time.monotonic() - t0 < LEASE + 2
        assert "taking over" in caplog.text and "on other-vm since" in caplog.text
    finally:
        proc.kill()
