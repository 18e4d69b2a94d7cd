"""The trainer's ``--workdir`` as a ``file:///...`` URL: a run is trained, ends, and is resumed from the workdir.
The same on ``gs://`` (against a GCS emulator on loopback, with the clients of a pod: gcsfs behind epath for our
files, TensorStore's GCS driver for orbax's arrays) is part of the pod rehearsal, ``test_pod_rehearsal.py``."""

from __future__ import annotations

import pytest
from train_helpers import DIT, check_run, run, train_cmd

FLAGS = ("--config.checkpoint.every_steps=10", "--config.log.sample_every_steps=10")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def train(workdir: str, data_dir, steps: int) -> str:
    result = run(train_cmd(DIT, workdir, data_dir, *FLAGS, f"--config.num_steps={steps}"))
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def test_file_url_workdir_trains_and_resumes(tmp_path, data_dir):
    url = f"file://{tmp_path}/w"
    train(url, data_dir, 10)
    check_run(str(tmp_path / "w"), [10])  # written at the local path
    out = train(url, data_dir, 20)
    assert f"resumed from {tmp_path}/w/checkpoints at step 10" in out
    check_run(url, [10, 20])
