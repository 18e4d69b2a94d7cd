"""A trainer that lost its workdir never writes to it again (fencing), as real trainer processes.

A trainer frozen with SIGSTOP past its lease (a stalled VM) is taken over by a trainer on another host
(``unshare --uts``: root on Linux, else skipped); thawed with SIGCONT, it stops at once with one line
naming the new holder (or saying the lock is gone) and writes nothing more. Each trainer's checkpoints
are told apart by the ``num_steps`` in their ``meta`` item. docs/reliability.md states the rule.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_helpers import DIT, checkpoint_steps, error_line, free_port, start, train_cmd, wait_for

from gmflow_jax.checkpoint import CHECKPOINT_DIR, MANIFEST_DIR, read_meta, verify_step

LEASE = 10.0  # s: the heartbeat renews every 2.5 s; a renewal held up for 5 s would end the lease (loaded CI)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture
def on_host():
    """``on_host(name, cmd)``: ``cmd`` run under the host name ``name`` (``unshare --uts``)."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--uts", "hostname", "x"], capture_output=True).returncode:
        pytest.skip("cannot run a process under another host name here (needs unshare --uts as root)")
    return lambda name, cmd: [unshare, "--uts", "sh", "-c", f'hostname {name} && exec "$@"', "sh", *cmd]


def dit(workdir, data_dir, steps: int, every: int, *flags) -> list[str]:
    return train_cmd(
        DIT,
        workdir,
        data_dir,
        f"--config.num_steps={steps}",
        f"--config.checkpoint.every_steps={every}",
        f"--config.checkpoint.lock_lease_seconds={LEASE}",
        *flags,
    )


def logged_steps(log: Path) -> list[int]:
    return [int(s) for s in re.findall(r"\] \[(\d+)\] ema_beta", log.read_text())]


def ended(proc: subprocess.Popen, log: Path, code: int, timeout: float = 120) -> str:
    """Waits for ``proc``; its exit status is ``code``; returns its last line (one error line unless 0)."""
    proc.wait(timeout=timeout)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout=log.read_text())
    if code == 0:
        assert proc.returncode == 0, result.stdout[-3000:]
        return ""
    return error_line(result, code)


def files(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def written_by(work: Path) -> dict[int, int]:
    """``{step: num_steps of the trainer that wrote it}``."""
    return {s: read_meta(work / CHECKPOINT_DIR, s)["config"]["num_steps"] for s in checkpoint_steps(work)}


def freeze_after_checkpoint(proc: subprocess.Popen, work: Path, step: int) -> None:
    """SIGSTOP once ``step`` and its manifest are written: with synchronous saves, the next save is a whole
    interval away, so none is in flight (one in flight is the window docs/reliability.md names)."""
    manifest = work / MANIFEST_DIR / f"{step}.json"
    wait_for(lambda: manifest.exists() and step in checkpoint_steps(work), timeout=900, proc=proc, poll=0.01)
    proc.send_signal(signal.SIGSTOP)


def test_stalled_trainers_woken_after_a_takeover_stop_and_write_nothing(tmp_path, data_dir, on_host):
    """pod-a is frozen after step 70 and taken over by pod-b, which is frozen after step 200 and taken over by
    pod-c. pod-a wakes while pod-c trains (pod-c finishes unharmed); pod-b wakes after pod-c has finished and
    removed its lock. Neither writes anything after waking."""
    work, logs = tmp_path / "w", {name: tmp_path / f"{name}.log" for name in ("a", "b", "c")}
    sync = "--config.checkpoint.async_save=false"
    a = start(on_host("pod-a", dit(work, data_dir, 1_000_000, 70, sync)), log=logs["a"])
    b = c = None
    try:
        freeze_after_checkpoint(a, work, 70)
        b = start(on_host("pod-b", dit(work, data_dir, 1_000_001, 100, sync)), log=logs["b"])
        freeze_after_checkpoint(b, work, 200)
        assert "resumed from" in logs["b"].read_text() and "taking over" in logs["b"].read_text()
        c = start(on_host("pod-c", dit(work, data_dir, 290, 30)), log=logs["c"])
        wait_for(lambda: any(s > 200 for s in logged_steps(logs["c"])), timeout=900, proc=c, poll=0.02)
        assert json.loads((work / "trainer.lock").read_text())["host"] == "pod-c"

        # the new holder still running: pod-a wakes, stops at its next step, names pod-c
        before = logged_steps(logs["a"])
        thawed = time.monotonic()
        a.send_signal(signal.SIGCONT)
        line = ended(a, logs["a"], 1)
        assert re.search(rf"trainer.lock was taken over by pid {c.pid} on pod-c since .*last renewed at ", line), line
        assert time.monotonic() - thawed < LEASE / 4 + 30  # the stop, then the process's own teardown
        assert max(logged_steps(logs["a"])) <= max(before) + 2  # no more than the step in flight
        ended(c, logs["c"], 0)  # unharmed
        assert written_by(work) == {240: 290, 270: 290, 290: 290}  # pod-a's next save (140) never happened
        assert all(verify_step(work / CHECKPOINT_DIR, s) is None for s in (240, 270, 290))
        assert not (work / "trainer.lock").exists()

        # the new holder finished: pod-b wakes, finds the lock gone, changes nothing
        kept = {d: files(work / d) for d in (CHECKPOINT_DIR, MANIFEST_DIR)}
        b.send_signal(signal.SIGCONT)
        line = ended(b, logs["b"], 1)
        assert re.search(r"trainer.lock is gone: .*last renewed at ", line), line
        assert {d: files(work / d) for d in (CHECKPOINT_DIR, MANIFEST_DIR)} == kept
        assert not (work / "trainer.lock").exists()  # never recreated
    finally:
        for proc in (a, b, c):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()


def test_two_process_holder_losing_its_lease_stops_every_process(tmp_path, data_dir):
    """2 processes on loopback; the lock is taken over (written by another host's trainer) after step 50:
    both processes stop within a quarter lease and a step, with process 0's line, and save nothing more."""
    work, port = tmp_path / "w", free_port()
    procs, logs = [], [tmp_path / f"p{i}.log" for i in range(2)]
    for i in range(2):
        flags = (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}")
        cmd = dit(work, data_dir, 1_000_000, 50, "--config.checkpoint.async_save=false", *flags)
        procs.append(start(cmd, log=logs[i]))
    try:
        manifest = work / MANIFEST_DIR / "50.json"  # synchronous saves: none in flight once it is written
        wait_for(lambda: manifest.exists() and 50 in checkpoint_steps(work), timeout=900, proc=procs[0], poll=0.01)
        new = {"host": "pod-b", "pid": 4242, "started": "now", "token": "pod-b's", "lease_s": LEASE, "beat": 0}
        (work / "trainer.lock").write_text(json.dumps(new))
        taken = time.monotonic()
        lines = [ended(p, log, 1) for p, log in zip(procs, logs, strict=True)]
        assert time.monotonic() - taken < LEASE / 4 + 30
        for line in lines:
            assert re.search(r"trainer.lock was taken over by pid 4242 on pod-b since now: .*last renewed at ", line)
        assert checkpoint_steps(work) == [50]
        assert json.loads((work / "trainer.lock").read_text()) == new  # never rewritten or removed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_unreadable_lock_skips_saves_then_stops_after_a_lease(tmp_path, data_dir):
    """The lock cannot be read (here: a folder in its place): saves are skipped with a warning, never written
    unfenced; after a whole lease without a successful read the run stops in one line."""
    work, log = tmp_path / "w", tmp_path / "t.log"
    proc = start(dit(work, data_dir, 1_000_000, 50, "--config.checkpoint.async_save=false"), log=log)
    try:  # synchronous saves: once step 50 is listed no save is in flight (the next is 50 steps away)
        wait_for(lambda: 50 in checkpoint_steps(work), timeout=900, proc=proc, poll=0.02)
        kept = files(work / CHECKPOINT_DIR)
        lock = work / "trainer.lock"
        lock.unlink()
        lock.mkdir()
        broken = time.monotonic()
        line = ended(proc, log, 1)
        assert LEASE * 0.5 < time.monotonic() - broken < LEASE + 30
        assert re.search(r"lease on .*trainer.lock ran out: .*\(it could not be read: IsADirectoryError", line), line
        skipped = [int(s) for s in re.findall(r"checkpoint step (\d+) not saved", log.read_text())]
        assert skipped and min(skipped) == 100, skipped
        assert checkpoint_steps(work) == [50] and files(work / CHECKPOINT_DIR) == kept and lock.is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()
