"""The local cache (``$GMFLOW_JAX_CACHE``, else ``~/.cache/gmflow_jax``) and the downloads that fill it.

    path = local_copy("https://host/dir/pt_inception-2015-12-05-6726825d.pth")  # downloaded once, then reused
    path = local_copy("gs://bucket/ref.npz")  # anything but http(s):// is returned unchanged

A URL's file is kept at ``<cache>/downloads/<host>/<path>``. It is downloaded with a progress line (size, MB/s,
ETA) into a temporary name beside it and renamed only when complete and verified: the byte count against the
server's ``Content-Length``, and, when the file name carries a hash prefix (torch.hub's convention,
``name-<hex>.ext``: the hex digits after the last ``-`` before a ``.``), the SHA-256 against that prefix. A failed,
truncated or mismatching download leaves nothing and raises :class:`DownloadError`, one line naming the URL and
what went wrong. A file in the cache is used as it is, without the network. Only the standard library is used.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TextIO

HASH_PREFIX = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's HASH_REGEX: 'pt_inception-2015-12-05-6726825d.pth'
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0  # per socket operation, not for the whole download


class DownloadError(OSError):
    """A download that failed; its message names the URL and what went wrong."""


def default_cache_dir() -> str:
    """``$GMFLOW_JAX_CACHE`` if set, else ``~/.cache/gmflow_jax``."""
    return os.environ.get("GMFLOW_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gmflow_jax")


def is_http_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ``http://`` or ``https://`` URL (read through :func:`fetch`, not a filesystem)."""
    return os.fspath(path).lower().startswith(("http://", "https://"))


def local_copy(path: str | os.PathLike, cache_dir: str | None = None) -> str:
    """``path`` itself, or for an ``http(s)://`` URL the path of its file in the cache (:func:`fetch`)."""
    return fetch(os.fspath(path), cache_dir) if is_http_url(path) else os.fspath(path)


def cache_path(url: str, cache_dir: str | None = None) -> str:
    """Where :func:`fetch` keeps ``url``'s file: ``<cache>/downloads/<host>/<path>``; ValueError naming a URL
    without a file name or with ``.``/``..`` segments."""
    parts = urllib.parse.urlsplit(url)
    segments = urllib.parse.unquote(parts.path).split("/")
    if not parts.netloc or not segments[-1] or any(s in (".", "..") for s in segments):
        raise ValueError(f"URL {url!r} does not name a file; expected http(s)://HOST/PATH/NAME")
    host = parts.netloc.rsplit("@", 1)[-1].replace(":", "_")
    return os.path.join(cache_dir or default_cache_dir(), "downloads", host, *[s for s in segments if s])


def expected_hash_prefix(name: str) -> str | None:
    """The SHA-256 prefix a file name promises (``'6726825d'`` for ``pt_inception-2015-12-05-6726825d.pth``)."""
    match = HASH_PREFIX.search(name)
    return match.group(1) if match else None


def fetch(url: str, cache_dir: str | None = None, progress: TextIO | None = sys.stderr) -> str:
    """The local path of ``url``'s file, downloaded into the cache the first time (module docstring).

    ``progress``: where the progress line goes (None: nowhere). Raises :class:`DownloadError`."""
    dest = cache_path(url, cache_dir)
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    # hidden, and unique across the hosts of a pod that share one cache folder
    tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{socket.gethostname()}-{os.getpid()}")
    try:
        digest, size = _download(url, tmp, progress)
        want = expected_hash_prefix(os.path.basename(dest))
        if want is not None and not digest.startswith(want):
            raise DownloadError(f"SHA-256 {digest[:16]}… does not start with the file name's hash prefix {want}")
        os.replace(tmp, dest)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        raise DownloadError(f"download of {url} failed: {_reason(e)}") from e
    if progress is not None:
        print(f"downloaded {url} → {dest} ({_mb(size)})", file=progress, flush=True)
    return dest


def _download(url: str, tmp: str, progress: TextIO | None) -> tuple[str, int]:
    """Streams ``url`` into ``tmp``; (SHA-256 hex digest, byte count). Raises on a short or failed body."""
    request = urllib.request.Request(url, headers={"User-Agent": "gmflow_jax"})
    sha, done = hashlib.sha256(), 0
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = _Progress(url, total, progress)
        try:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except http.client.IncompleteRead as e:
                    done += len(e.partial)
                    break
                if not chunk:
                    break
                out.write(chunk)
                sha.update(chunk)
                done += len(chunk)
                bar.update(done)
        finally:
            bar.close(done)
    if total is not None and done != total:
        raise DownloadError(f"truncated: the connection closed after {done} of {total} bytes")
    return sha.hexdigest(), done


def _reason(e: BaseException) -> str:
    """What went wrong, in one line."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"cannot connect ({e.reason})"
    if isinstance(e, DownloadError):
        return str(e)
    first = (str(e).splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class _Progress:
    """One progress line: bytes done of the total, MB/s and ETA; redrawn in place on a terminal, else a line
    every 10 s."""

    def __init__(self, url: str, total: int | None, stream: TextIO | None):
        self.url, self.total, self.stream = url, total, stream
        self.tty = stream is not None and stream.isatty()
        self.t0 = self.last = time.monotonic()

    def _line(self, done: int) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = done / elapsed
        size = f"{_mb(done)} of {_mb(self.total)}" if self.total else _mb(done)
        eta = f", ETA {(self.total - done) / max(rate, 1e-9):.0f} s" if self.total else ""
        return f"downloading {self.url}: {size}, {rate / 1e6:.1f} MB/s{eta}"

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.stream is None or now - self.last < (0.2 if self.tty else 10.0):
            return
        self.last = now
        print(("\r" if self.tty else "") + self._line(done), end="" if self.tty else "\n", file=self.stream, flush=True)

    def close(self, done: int) -> None:
        if self.stream is not None:
            print(("\r" if self.tty else "") + self._line(done), file=self.stream, flush=True)
