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

import numpy as np
import pytest
from etils import epath
from test_workdir_paths import gcs  # noqa: F401 - the stand-in object store

from gmflow_jax.train import lock as lock_lib
from gmflow_jax.train.fence import Fence, StopRequest
from gmflow_jax.train.lock import LOCK_FILE, LockLostError, WorkdirLock, WorkdirLockedError

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


def test_removed_lock_is_lost_and_never_recreated(tmp_path, caplog):
    held = WorkdirLock(str(tmp_path), 0.2)
    held.acquire()
    (tmp_path / LOCK_FILE).unlink()  # a person or another tool removed it
    time.sleep(0.4)
    assert held.holds() is False and re.search(r"trainer.lock is gone: .*last renewed at ", held.lost)
    assert "is gone" in caplog.text  # the heartbeat said so
    held.release()
    assert not (tmp_path / LOCK_FILE).exists()  # not recreated


def test_lease_that_ran_out_is_lost_even_if_the_lock_still_names_this_trainer(tmp_path, monkeypatch):
    held = WorkdirLock(str(tmp_path), 600)
    held.acquire()
    mine = (tmp_path / LOCK_FILE).read_text()
    assert held.holds() is True and 599 < held.time_left() <= 600
    now = lock_lib._clock()
    monkeypatch.setattr(lock_lib, "_clock", lambda: now + 601)  # as if stalled for a whole lease
    assert held.holds() is False
    assert re.search(
        r"lease on .*trainer.lock ran out: it was last renewed at .*more than a lease \(600 s\)", held.lost
    )
    held.release()
    assert (tmp_path / LOCK_FILE).read_text() == mine  # left alone: a watcher may be taking it over


def test_no_renewal_written_with_less_than_a_quarter_lease_left(tmp_path, monkeypatch):
    held = WorkdirLock(str(tmp_path), 0.4)
    held.acquire()
    time.sleep(0.25)
    beat = json.loads((tmp_path / LOCK_FILE).read_text())["beat"]
    assert beat >= 1  # renewing
    start = lock_lib._clock()
    monkeypatch.setattr(lock_lib, "_clock", lambda: start + 0.35)  # 3/4 lease after the last write
    held._renewed = start
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["beat"] == beat  # not written late
    held.release()


def test_unreadable_lock_is_retried_within_the_lease_then_lost(tmp_path):
    lock = tmp_path / LOCK_FILE
    held = WorkdirLock(str(tmp_path), 3.0)  # the waits below are fractions of it: 3 s leaves room for a loaded host
    held.acquire()
    mine = lock.read_text()
    lock.unlink()
    lock.mkdir()  # reading it fails (as storage that cannot be reached)
    time.sleep(0.9)
    assert held.holds() is None and held.lost is None  # not known: not lost yet
    lock.rmdir()
    lock.write_text(mine)  # readable again within the lease
    time.sleep(0.9)
    assert held.holds() is True and json.loads(lock.read_text())["beat"] > json.loads(mine)["beat"]  # renewed again
    lock.unlink()
    lock.mkdir()
    time.sleep(3.3)  # a whole lease without a successful read
    assert held.holds() is False and re.search(r"ran out: .*\(it could not be read: IsADirectoryError", held.lost)
    held.release()
    assert lock.is_dir()


def test_fence_of_a_single_process(tmp_path):
    held = WorkdirLock(str(tmp_path), 1.0)
    held.acquire()
    fence = Fence(held, 1.0)
    assert fence.may_save(10, last=False) and fence.may_write("config.json") and not fence.lost_here()
    lock = tmp_path / LOCK_FILE
    mine = lock.read_text()
    lock.unlink()
    lock.mkdir()
    assert not fence.may_save(20, last=False) and not fence.may_write("preview")  # skipped, not written unfenced
    t0 = time.monotonic()
    with pytest.raises(LockLostError, match="ran out"):  # the last save retries within the lease, then stops
        fence.may_save(30, last=True)
    assert 0.5 < time.monotonic() - t0 < 1.5
    assert fence.lost_here()
    lock.rmdir()
    lock.write_text(mine)
    with pytest.raises(LockLostError, match="ran out"):  # lost for good
        fence.may_save(40, last=False)
    held.release()


def test_stop_request_raises_once_the_lock_is_taken(tmp_path):
    held = WorkdirLock(str(tmp_path), 0.4)
    held.acquire()
    stop = StopRequest(10, Fence(held, 0.4))
    assert stop.should_stop(1) is False
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "pod-b", "pid": 5, "started": "now", "token": "b"}))
    t0 = time.monotonic()
    with pytest.raises(LockLostError, match="taken over by pid 5 on pod-b"):
        while time.monotonic() - t0 < 5:
            stop.should_stop(2)
            time.sleep(0.01)
    assert time.monotonic() - t0 < 0.4 / 4 + 0.3  # noticed within a quarter lease
    held.release()


def test_processes_compare_at_least_every_eighth_of_a_lease(tmp_path, monkeypatch):
    """Two processes (simulated: every gather returns this process's votes twice): the agreement comes every
    ``check_every`` steps, or every eighth of a lease when that is fewer steps; a lost lock stops there."""
    from gmflow_jax.train import fence as fence_lib

    gathered = []
    monkeypatch.setattr(fence_lib.jax, "process_count", lambda: 2)
    monkeypatch.setattr(fence_lib, "_gather", lambda v: gathered.append(v) or np.asarray([v, v]))
    monkeypatch.setattr(fence_lib, "_from_process_0", lambda code, message: (code, message))
    held = WorkdirLock(str(tmp_path), 60.0)
    held.acquire()
    stop = StopRequest(10, Fence(held, 0.8))  # the agreement's lease: 0.8 s, an eighth is 0.1 s
    checked = []
    for step in range(60):
        time.sleep(0.02)  # at most 5 steps in an eighth of the lease
        before = len(gathered)
        assert stop.should_stop(step) is False
        if len(gathered) > before:
            checked.append(step)
    gaps = np.diff(checked)
    assert checked[0] == 0 and gaps[0] == 1, checked  # no step time measured yet: the next step
    assert all(1 <= g <= 5 for g in gaps) and max(gaps) > 1, checked  # not every step; never past 1/8 lease
    assert [int(v[2]) for v in gathered[:-1]] == list(gaps)  # each agreement set the next one
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "pod-b", "pid": 5, "started": "now", "token": "b"}))
    held.holds()
    with pytest.raises(LockLostError, match="taken over by pid 5 on pod-b"):
        for step in range(60, 80):
            stop.should_stop(step)
    held.release()


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


def test_fence_on_an_object_store(gcs, monkeypatch):  # noqa: F811 - the imported fixture
    """The fencing read on ``gs://`` (the stand-in object store of test_workdir_paths)."""
    monkeypatch.setattr(lock_lib, "SETTLE_S", 0.0)
    path = epath.Path(gcs) / LOCK_FILE
    held = WorkdirLock(gcs, 0.4)
    held.acquire()
    fence = Fence(held, 0.4)
    assert fence.may_save(1, last=True) and held.holds() is True
    path.write_text(json.dumps({"host": "pod-b", "pid": 5, "started": "now", "token": "b"}))
    with pytest.raises(LockLostError, match=r"gs://bucket/run/trainer.lock was taken over by pid 5 on pod-b"):
        fence.may_save(2, last=False)
    held.release()
    assert json.loads(path.read_text())["token"] == "b"  # the new holder's lock is left alone
