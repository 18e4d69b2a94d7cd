"""Downloads into the cache (gmflow_jax.cache) from a real HTTP server on loopback (no mocks): a verified file once,
then reused with the server gone; a hash mismatch, a truncated body and a 404 each leave nothing behind and are one
line naming the URL and what went wrong."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import threading

import pytest

from gmflow_jax import cache

PAYLOAD = os.urandom(3 << 20)  # 3 MiB: several chunks of the download loop
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path]`` (bytes); a path in ``server.truncate`` announces the whole length but sends half,
    then closes the connection; anything else is a 404."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if self.path in self.server.truncate else data)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    """A threading HTTP server on 127.0.0.1 (a free port); yields (base URL, server); shut down after the test."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files = {
        f"/weights/model-2015-12-05-{DIGEST[:8]}.pth": PAYLOAD,
        "/weights/model-2015-12-05-0badc0de.pth": PAYLOAD,  # a name promising another hash
        "/ref/batch.npz": PAYLOAD,
        "/ref/short.npz": PAYLOAD,
    }
    srv.truncate = {"/ref/short.npz"}
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def _files(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_download_is_verified_cached_and_reused_offline(server, tmp_path, monkeypatch):
    base, srv = server
    monkeypatch.setenv("GMFLOW_JAX_CACHE", str(tmp_path / "cache"))
    url = f"{base}/weights/model-2015-12-05-{DIGEST[:8]}.pth"
    log = io.StringIO()
    path = cache.fetch(url, progress=log)
    assert path == cache.cache_path(url) and path.startswith(str(tmp_path / "cache" / "downloads"))
    with open(path, "rb") as f:
        assert f.read() == PAYLOAD
    assert _files(tmp_path / "cache") == [os.path.relpath(path, tmp_path / "cache")]  # no temporary left
    lines = log.getvalue().splitlines()
    assert "3.1 MB of 3.1 MB" in lines[-2] and "MB/s" in lines[-2] and "ETA 0 s" in lines[-2], lines
    assert lines[-1].startswith(f"downloaded {url}")

    # the server gone: the cached file, without the network (a fresh download would fail to connect)
    srv.shutdown()
    srv.server_close()
    log = io.StringIO()
    assert cache.local_copy(url) == path and cache.fetch(url, progress=log) == path and log.getvalue() == ""
    with pytest.raises(cache.DownloadError, match=r"cannot connect"):
        cache.fetch(f"{base}/ref/batch.npz")
    assert cache.local_copy(str(tmp_path / "x.npz")) == str(tmp_path / "x.npz")  # paths are left as they are
    assert cache.local_copy("gs://bucket/x.npz") == "gs://bucket/x.npz"


def test_a_name_without_hash_is_taken_as_it_comes(server, tmp_path):
    base, _ = server
    path = cache.fetch(f"{base}/ref/batch.npz", str(tmp_path), progress=None)
    with open(path, "rb") as f:
        assert f.read() == PAYLOAD


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (
            "/weights/model-2015-12-05-0badc0de.pth",
            f"SHA-256 {DIGEST[:16]}… does not start with the file name's hash prefix 0badc0de",
        ),  # fmt: skip
        ("/ref/short.npz", f"truncated: the connection closed after {len(PAYLOAD) // 2} of {len(PAYLOAD)} bytes"),
        ("/ref/missing.npz", "HTTP 404 Not Found"),
    ],
    ids=["hash_mismatch", "truncated", "404"],  # the payload is random: ids from it would differ between xdist workers
)
def test_a_failed_download_leaves_nothing(server, tmp_path, name, why):
    base, _ = server
    with pytest.raises(cache.DownloadError) as e:
        cache.fetch(base + name, str(tmp_path), progress=None)
    assert str(e.value) == f"download of {base + name} failed: {why}"
    assert _files(tmp_path) == []


def test_hash_prefix_follows_torch_hub():
    assert cache.expected_hash_prefix("pt_inception-2015-12-05-6726825d.pth") == "6726825d"
    assert cache.expected_hash_prefix("VIRTUAL_imagenet256_labeled.npz") is None
    with pytest.raises(ValueError, match="does not name a file"):
        cache.cache_path("https://host/dir/")
    with pytest.raises(ValueError, match="does not name a file"):
        cache.cache_path("https://host/../etc/passwd")
