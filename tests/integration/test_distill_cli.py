"""pi-Flow distillation through the trainer's command: a student of a CLI-trained teacher resumes
exactly, previews its own samples, and a bad teacher is refused before the student's workdir exists.
The Colab notebook runs end to end (papermill) on this teacher and student."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helpers import DIT, ROOT, check_run, child_env, error_line, flat, load_state, run, train_cmd

STUDENT = "digits_piflow:tiny"  # K = 8 on the tiny digits trunk, 1 NFE


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, data_dir) -> str:
    work = tmp_path_factory.mktemp("teacher") / "run"
    result = run(train_cmd(DIT, work, data_dir, "--config.num_steps=3", "--config.checkpoint.every_steps=3"))
    assert result.returncode == 0, result.stdout[-3000:]
    return str(work)


def student(workdir, data_dir, teacher, *flags):
    return train_cmd(STUDENT, workdir, data_dir, f"--config.distill.teacher={teacher}", *flags)


FLAGS = ("--config.checkpoint.every_steps=2", "--config.log.sample_every_steps=4")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir, teacher) -> tuple[str, str]:
    """A student trained 4 steps in one run: its workdir and its output."""
    work = tmp_path_factory.mktemp("straight") / "run"
    result = run(student(work, data_dir, teacher, "--config.num_steps=4", *FLAGS))
    assert result.returncode == 0, result.stdout[-3000:]
    return str(work), result.stdout


@pytest.mark.slow
def test_student_trains_resumes_exactly_and_previews(tmp_path, data_dir, teacher, straight):
    assert "student initialised from the teacher" in straight[1] and "loss_piid=" in straight[1]
    first = run(student(tmp_path / "resumed", data_dir, teacher, "--config.num_steps=2", *FLAGS))
    assert first.returncode == 0, first.stdout[-3000:]
    second = run(student(tmp_path / "resumed", data_dir, teacher, "--config.num_steps=4", *FLAGS))
    assert second.returncode == 0, second.stdout[-3000:]
    assert "resumed from" in second.stdout and "student initialised" not in second.stdout
    a, b = flat(load_state(straight[0])), flat(load_state(tmp_path / "resumed"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k  # the teacher's weights and the pi-ID draws repeat exactly
    check_run(straight[0], [2, 4])


@pytest.mark.slow
def test_notebook_runs_on_the_digits(tmp_path, teacher, straight):
    """``papermill notebooks/gmflow_jax.ipynb`` on the teacher and its student: every cell runs, no error output,
    the four pictures and the class names, sweep, student and timing lines are there. One sample per class and
    one solver comparison step count (8) keep it to 4 compilations (XLA's CPU back end unoptimised: the
    notebook's timings are not under test)."""
    pytest.importorskip("papermill")
    nbformat = pytest.importorskip("nbformat")
    out = tmp_path / "out.ipynb"
    params = ["-p", "workdir", teacher, "-p", "student_workdir", straight[0], "-p", "install", "False"]
    params += ["-p", "num_per_class", "1", "-y", "compare_steps: [8]"]
    cmd = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "gmflow_jax.ipynb"), str(out), *params]
    env = child_env()
    env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    cells = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in cells)
    outputs = [o for c in cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], result.stderr[-3000:]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "{'zero': 0, '3': 3, 'Seven': 7}" in text
    assert "refused: unknown class name 'sevn'; did you mean 'seven'?" in text
    assert "6 guidance values: 1 compilation, samples (6, 3, 8, 8, 1)" in text
    assert re.search(r"warm wall time: student [\d.]+ s, teacher [\d.]+ s", text), text
    rows = re.findall(r"^(.+?)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", text, flags=re.M)
    assert [(r[0], int(r[1])) for r in rows] == [
        ("class grid: GM-ODE 2, 8 steps, w̃ = 0.1", 3),
        ("GM-ODE 2, 8 steps, sweep of 6 w̃", 18),
        ("GM-ODE 2, 8 steps, w̃ = 0.1", 3),
        ("GM-SDE 2, 8 steps, w̃ = 0.1", 3),
        ("pi-Flow student, 1 NFE", 3),
        ("teacher GM-ODE 2, 8 steps × 2, w̃ = 0.3", 3),
    ], text


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--config.distill.teacher={missing}", r"config\.distill\.teacher='.*nowhere': "),
        ("--config.model.num_gaussians=3", r"num_gaussians=3 cannot be initialised from the teacher's 2 Gaussians"),
        ("--config.distill.guidance=2.0", r"config\.distill\.guidance=2\.0 is a CFG scale, but .* is a GMFlow teacher"),
    ],
)
def test_bad_teacher_is_one_line_and_changes_nothing(tmp_path, data_dir, teacher, flag, message):
    before = sorted(p.name for p in Path(teacher).rglob("*"))
    cmd = student(tmp_path / "student", data_dir, teacher, flag.format(missing=tmp_path / "nowhere"))
    line = error_line(run(cmd), 1)
    assert re.search(message, line), line
    assert not (tmp_path / "student").exists()
    assert sorted(p.name for p in Path(teacher).rglob("*")) == before
