"""One trainer per workdir (``gmflow_jax.train.lock``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from gmflow_jax.train.lock import LOCK_FILE, WorkdirLock, WorkdirLockedError


def test_second_holder_is_refused_naming_the_first(tmp_path):
    with WorkdirLock(str(tmp_path)):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(WorkdirLockedError, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}"):
            WorkdirLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_FILE).exists()  # released


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    info = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "earlier"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(info))
    with WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_lock_from_another_host_is_not_guessed_at(tmp_path):
    info = {"host": "some-other-host", "pid": 1, "started": "earlier"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(info))
    with pytest.raises(WorkdirLockedError, match="some-other-host.*delete the lock file"):
        WorkdirLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == info  # untouched
