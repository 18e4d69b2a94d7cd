"""File I/O on local, ``file://`` and ``gs://`` paths: the one place that knows where a path lives.

``workdir_path`` turns what the user gave (a local path, ``file:///...`` or ``gs://BUCKET/...``) into an
``etils.epath.Path``; every helper here goes through ``epath``, so the same code runs on a local disk and
on Google Cloud Storage (through ``gcsfs``). Writers are all-or-nothing for readers: locally through a
temporary name and a rename, on an object store in one upload. Used by training, evaluation, data,
conversion and checkpoints alike.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
from etils import epath

URL_SCHEMES = ("gs",)  # object stores that both epath (gcsfs) and orbax (TensorStore's gcs driver) write

# gcsfs keeps folder listings for the life of the process, but TensorStore (orbax's arrays) and other
# processes write without it: a kept listing would hide their new steps. So gs:// listings are not kept.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def workdir_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a local path made absolute (``~`` expanded), ``file:///x`` as the local
    ``/x``, ``gs://BUCKET/x`` as it is. ``ValueError`` naming any other URL, or a ``gs://`` path without a GCS
    client (the ``[gcs]`` extra). Every command that reads or writes a user's path goes through here."""
    text = os.fspath(path)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    if scheme == "file":
        url = urllib.parse.urlsplit(text)
        if url.netloc not in ("", "localhost") or url.query or url.fragment:
            raise ValueError(f"path {text!r} is not a local file URL; expected file:///ABSOLUTE/PATH.")
        return epath.Path(os.path.abspath(urllib.parse.unquote(url.path)))
    if scheme in URL_SCHEMES and rest.split("/")[0]:
        if importlib.util.find_spec("gcsfs") is None and importlib.util.find_spec("tensorflow") is None:
            raise ValueError(f"path {text!r} needs gcsfs: pip install 'gmflow_jax[gcs]' (or gcsfs)")
        return epath.Path(text)
    raise ValueError(f"path {text!r} is not supported; expected a local path, file:///... or gs://BUCKET/...")


def is_url(path: str | os.PathLike) -> bool:
    """Whether ``path`` (as ``workdir_path`` returns it) is on an object store, not the local filesystem."""
    return "://" in os.fspath(path)


def write_atomic(path: epath.Path, data: str | bytes) -> None:
    """Writes ``path`` so that readers see the old file or the new one: locally through ``<path>.tmp<pid>`` (several
    processes may write one file) and a replace; on an object store in one upload (all-or-nothing there)."""
    tmp = path if is_url(path) else path.parent / f"{path.name}.tmp{os.getpid()}"
    if isinstance(data, str):
        tmp.write_text(data)
    else:
        tmp.write_bytes(data)
    if tmp != path:
        tmp.replace(path)


def check_writable(folder: str | os.PathLike, what: str) -> epath.Path:
    """``folder`` as ``workdir_path`` gives it, after a test write (that leaves nothing behind: folders it made
    are removed again); ``ValueError`` naming ``what`` and the folder when it cannot be written (a missing
    bucket, no permission), before any work."""
    path = workdir_path(folder)
    probe = path / f".write_test.{os.getpid()}"
    made = None if is_url(path) else next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
        if made is not None:
            made.rmtree()
    except Exception as e:  # gcsfs and the OS raise many types
        hint = ": does the bucket exist, and may this account write to it?" if is_url(path) else ""
        raise ValueError(f"{what} {path} cannot be written ({describe(e)}){hint}") from None
    return path


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies one file between any two of local, ``file://`` and ``gs://`` (streamed), so that readers of ``dst``
    see the old file or the new one (locally through ``<name>.tmp<pid>`` and a rename)."""
    src, dst = workdir_path(src), workdir_path(dst)
    tmp = dst if is_url(dst) else dst.parent / f"{dst.name}.tmp{os.getpid()}"
    with src.open("rb") as r, tmp.open("wb") as w:
        shutil.copyfileobj(r, w, 1 << 24)
    if tmp != dst:
        tmp.replace(dst)


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Writes an uncompressed ``.npz`` at a local, ``file://`` or ``gs://`` path so that readers see the old file or
    the new one, streamed (a 50K × 256² sample file is 9.8 GB): locally through ``<stem>.tmp<pid>.npz`` and a
    rename (several processes may write one folder); on an object store in one upload."""
    path = workdir_path(path)
    tmp = path if is_url(path) else path.parent / f"{path.stem}.tmp{os.getpid()}.npz"
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    if tmp != path:
        tmp.replace(path)


@contextlib.contextmanager
def open_npz(path: str | os.PathLike) -> Iterator[Any]:
    """``np.load`` of an ``.npz`` at a local, ``file://`` or ``gs://`` path (no pickles), as a context manager."""
    with workdir_path(path).open("rb") as fh, np.load(fh, allow_pickle=False) as f:
        yield f


def move(src: epath.Path, dst: epath.Path) -> None:
    """Moves a file or folder: a rename locally; on an object store (no rename, no folders) a copy of every
    file, then the delete of ``src`` (not atomic: interrupted, both may hold part of the files)."""
    if not is_url(src):
        shutil.move(src, dst)
    elif src.is_dir():
        for rel in file_sizes(src):
            (src / rel).copy(dst / rel, overwrite=True)
        src.rmtree()
    else:
        src.copy(dst, overwrite=True)
        src.unlink()


def file_sizes(directory: str | os.PathLike) -> dict[str, int]:
    """``{path relative to directory: size in bytes}`` of every file below ``directory``."""
    top = workdir_path(directory)
    base = os.fspath(top).split("://", 1)[-1]  # fsspec names the folders it walks without the scheme
    out = {}
    for root, _, files in top.walk():
        for name in files:
            rel = os.path.relpath(os.path.join(os.fspath(root), name), base)
            out[rel] = file_size(top / rel)
    return out


def file_size(path: str | os.PathLike) -> int:
    """The size of a file in bytes (local, ``file://`` or ``gs://``)."""
    path = workdir_path(path)
    # locally os.path: epath's stat also looks the owner up, which fails for a uid without a passwd entry
    return path.stat().length if is_url(path) else os.path.getsize(path)


def describe(e: BaseException, limit: int = 300) -> str:
    """How a failure is reported, in one line: the message of our own errors (classes defined in
    ``gmflow_jax``, e.g. ``CheckpointError``), else the type and message of the innermost exception of the
    chain (orbax wraps storage errors, whose message says what is wrong), its middle elided past ``limit``
    characters (storage errors put the useful part last)."""
    own = _is_own(e)
    if not own:
        for _ in range(8):
            inner = e.__cause__ or e.__context__
            if inner is None:
                break
            e = inner
    first = (str(e).splitlines() or [""])[0]
    if len(first) > limit:
        first = f"{first[: limit // 3]} … {first[-(2 * limit) // 3 :]}"
    return first if own else f"{type(e).__name__}: {first}"


def _is_own(e: BaseException) -> bool:
    """Whether ``e`` is an error this package defines (its message is already one line for the user)."""
    return type(e).__module__.split(".")[0] == "gmflow_jax"
