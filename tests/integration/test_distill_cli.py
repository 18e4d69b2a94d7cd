"""pi-Flow distillation through the trainer's command: a student of a CLI-trained teacher resumes
exactly, previews its own samples, and a bad teacher is refused before the student's workdir exists."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from train_helpers import DIT, check_run, error_line, flat, load_state, run, train_cmd

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


@pytest.mark.slow
def test_student_trains_resumes_exactly_and_previews(tmp_path, data_dir, teacher):
    flags = ("--config.checkpoint.every_steps=2", "--config.log.sample_every_steps=4")
    straight = run(student(tmp_path / "straight", data_dir, teacher, "--config.num_steps=4", *flags))
    assert straight.returncode == 0, straight.stdout[-3000:]
    assert "student initialised from the teacher" in straight.stdout and "loss_piid=" in straight.stdout
    first = run(student(tmp_path / "resumed", data_dir, teacher, "--config.num_steps=2", *flags))
    assert first.returncode == 0, first.stdout[-3000:]
    second = run(student(tmp_path / "resumed", data_dir, teacher, "--config.num_steps=4", *flags))
    assert second.returncode == 0, second.stdout[-3000:]
    assert "resumed from" in second.stdout and "student initialised" not in second.stdout
    a, b = flat(load_state(tmp_path / "straight")), flat(load_state(tmp_path / "resumed"))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k  # the teacher's weights and the pi-ID draws repeat exactly
    check_run(str(tmp_path / "straight"), [2, 4])


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
