"""Never lose a run: the ordinary mistakes of a pod user, as real trainer processes.

Each test says what the user does and checks what they see (one line, the exit status) and that no
checkpoint is lost or silently replaced. The promise is written down in docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from train_helpers import DIT, checkpoint_steps, error_line, flat, load_state, run, start, train_cmd, wait_for

EVERY = "--config.checkpoint.every_steps=20"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds")


def dit(workdir, data_dir, *flags):
    return train_cmd(DIT, workdir, data_dir, EVERY, *flags)


def ok(result) -> str:
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def snapshot(workdir: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file in the workdir but the TensorBoard events."""
    return {
        str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(workdir.rglob("*"))
        if p.is_file() and "tensorboard" not in p.parts
    }


def test_resume_with_another_model_changes_nothing(tmp_path, data_dir):
    work = tmp_path / "w"
    ok(run(dit(work, data_dir, "--config.num_steps=40")))
    before = snapshot(work)
    for flag in ("--config.model.hidden_size=64", "--config.model.num_gaussians=8", "--config.model.depth=2"):
        for _attempt in range(2):  # the user's try, then a scheduler's automatic retry: the same answer
            result = run(dit(work, data_dir, "--config.num_steps=60", flag))
            line = error_line(result, 1)
            field = flag.split("=")[0].removeprefix("--config.")
            assert re.search(rf"{field} \d+ → \d+", line) and "Nothing was changed" in line, line
            assert "compiled the train step" not in result.stdout  # told before the compile
            assert snapshot(work) == before  # no file moved, rewritten or added
    out = ok(run(dit(work, data_dir, "--config.num_steps=60")))  # the corrected command resumes
    assert "resumed from" in out and "at step 40" in out
    assert checkpoint_steps(work) == [20, 40, 60]


def test_no_silent_fresh_start_when_every_step_is_damaged(tmp_path, data_dir):
    work = tmp_path / "w"
    ok(run(dit(work, data_dir, "--config.num_steps=40")))
    for step in (20, 40):  # truncate the largest file of every step
        files = [p for p in (work / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()]
        biggest = max(files, key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[:100])
    line = error_line(run(dit(work, data_dir, "--config.num_steps=60")), 1)
    assert "no checkpoint" in line and "can be restored" in line and "--restart_from_scratch" in line
    assert sorted(p.name for p in (work / "damaged_checkpoints").iterdir() if p.is_dir()) == ["20", "40"]
    assert (work / "damaged_checkpoints" / "40.reason.txt").read_text().count("bytes, expected") == 1
    line = error_line(run(dit(work, data_dir, "--config.num_steps=60")), 1)  # a retry does not start over
    assert "refusing to start over from step 0" in line and "--restart_from_scratch" in line
    assert checkpoint_steps(work) == []
    out = ok(run(dit(work, data_dir, "--config.num_steps=20", "--restart_from_scratch")))
    assert "replaced_runs" in out and checkpoint_steps(work) == [20]
    (old,) = (work / "replaced_runs").iterdir()
    assert sorted(p.name for p in (old / "damaged_checkpoints").iterdir() if p.is_dir()) == ["20", "40"]


def test_two_trainers_on_one_workdir(tmp_path, data_dir):
    work, log = tmp_path / "w", tmp_path / "first.log"
    first = start(dit(work, data_dir, "--config.num_steps=1000000", "--config.checkpoint.every_steps=100000"), log=log)
    try:
        wait_for(lambda: "ema_beta=" in log.read_text(), timeout=120, proc=first)
        line = error_line(run(dit(work, data_dir, "--config.num_steps=50")), 1)
        assert f"is in use by pid {first.pid} on " in line and "trainer.lock" in line, line
    finally:
        first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0, log.read_text()[-3000:]
    stopped = int(re.search(r"stopped at step (\d+)", log.read_text()).group(1))
    assert checkpoint_steps(work) == [stopped] and not (work / "trainer.lock").exists()
    # a trainer killed with -9 leaves its lock: the next start on this host takes it over
    crashed = start(dit(work, data_dir, "--config.num_steps=1000000", "--config.checkpoint.every_steps=100000"))
    wait_for(lambda: (work / "trainer.lock").exists(), timeout=120, proc=crashed)
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(timeout=30)
    out = ok(run(dit(work, data_dir, f"--config.num_steps={stopped + 5}")))
    assert "taking over" in out and f"pid {crashed.pid}" in out


@pytest.mark.parametrize(
    "body,message",
    [
        (
            "c.optim.weight_decy = 0.1",
            r"config\.optim\.weight_decy is not a field .*did you mean config\.optim\.weight_decay",
        ),
        ("c.optim.learning_rate = 5e-2", r"config\.optim\.learning_rate is not a field .*expected one of \[.*'lr'"),
        # ConfigDict itself refuses a value of another type than the schema's, naming the field
        ("c.optim.lr = '1e-3'", r"get_config failed: TypeError: Could not override field 'lr'"),
        ("c.num_steps = 1e4", r"get_config failed: TypeError: Could not override field 'num_steps'"),
    ],
)
def test_config_file_fields_are_checked_against_the_schema(tmp_path, data_dir, body, message):
    config = tmp_path / "mine.py"
    config.write_text(
        "from gmflow_jax.configs.digits_gmdit import get_config as digits\n\n\n"
        f"def get_config(arg=None):\n    c = digits('tiny')\n    {body}\n    return c\n"
    )
    line = error_line(run(train_cmd(str(config), tmp_path / "w", data_dir)), 2)
    assert re.search(message, line), line
    assert not (tmp_path / "w").exists()


def test_workdir_that_is_a_file(tmp_path, data_dir):
    (tmp_path / "w").write_text("not a directory")
    line = error_line(run(dit(tmp_path / "w", data_dir)), 1)
    assert "is a file; expected a directory" in line


def test_failed_save_stops_at_once_and_keeps_the_older_steps(tmp_path, data_dir):
    work = tmp_path / "w"
    ok(run(dit(work, data_dir, "--config.num_steps=40", "--config.log.every_steps=10")))
    reference = load_state(work)
    # no file may grow past 100 kB: the next checkpoint's arrays cannot be written
    result = run(dit(work, data_dir, "--config.num_steps=200", "--config.log.every_steps=10"), file_size_limit=100_000)
    line = error_line(result, 1)
    assert re.search(
        r"saving checkpoint step 60 .* failed \(.*File too large.*\).* earlier steps \[20, 40\] are intact", line
    )
    assert "Event loop is closed" not in result.stdout and len(result.stdout.splitlines()) < 150
    logged = [int(s) for s in re.findall(r"\] \[(\d+)\] ema_beta", result.stdout)]
    assert max(logged) <= 80, max(logged)  # stopped within one checkpoint interval of the failure
    assert checkpoint_steps(work) == [20, 40]
    for key, value in flat(reference).items():
        np.testing.assert_array_equal(flat(load_state(work))[key], value, err_msg=key)
    out = ok(run(dit(work, data_dir, "--config.num_steps=60")))  # without the limit it resumes
    assert "at step 40" in out
