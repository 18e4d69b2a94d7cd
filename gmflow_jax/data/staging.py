"""Datasets on an object store, read through a local copy: ``stage`` brings ``<data_dir>/<dataset>`` from
``gs://`` into ``<cache>/datasets/...`` file by file (``sync_folder``), since array_record would read it in place
at one request per random record."""

from __future__ import annotations

import json
import logging
import os
import time

from etils import epath

from gmflow_jax.cache import default_cache_dir
from gmflow_jax.storage import copy_file, file_sizes, is_url, workdir_path, write_atomic

log = logging.getLogger(__name__)


SYNC_MANIFEST = ".copied_from.json"  # in a copy: {file: [size, mtime] of the source file it was copied from}


def _stamp(path: epath.Path) -> list[float]:
    """``[size, mtime]`` of a file (locally through ``os.stat``: epath's also looks up the owner)."""
    if is_url(path):
        st = path.stat()
        return [st.length, st.mtime]
    st = os.stat(path)
    return [st.st_size, st.st_mtime]


def sync_folder(src: str | os.PathLike, dst: str | os.PathLike, last: tuple[str, ...] = ("dataset_info.json",)) -> int:
    """Copies the files of folder ``src`` to ``dst`` (local, ``file://`` or ``gs://``, either way) that are missing
    there, differ in size, or changed in ``src`` since they were copied (``dst/.copied_from.json`` keeps each
    source file's size and time); those named in ``last`` after all others (TFDS takes a dataset for complete
    once its ``dataset_info.json`` is there, so a copy cut short is never read as a dataset); logs GB/s and ETA;
    returns the bytes copied. A rerun after a kill copies only what is missing; after a rebuild, what changed."""
    src, dst = workdir_path(src), workdir_path(dst)
    sizes = {r: n for r, n in file_sizes(src).items() if r != SYNC_MANIFEST}
    have = file_sizes(dst) if dst.exists() else {}
    copied = json.loads((dst / SYNC_MANIFEST).read_text()) if SYNC_MANIFEST in have else {}
    stamps = {r: _stamp(src / r) for r in sizes}
    todo = [r for r in sizes if have.get(r) != sizes[r] or copied.get(r) != stamps[r]]
    todo.sort(key=lambda r: (os.path.basename(r) in last, r))
    total, done, t0, shown = sum(sizes[r] for r in todo), 0, time.monotonic(), 0.0
    for n, rel in enumerate(todo):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        copied.pop(rel, None)
        write_atomic(dst / SYNC_MANIFEST, json.dumps(copied))  # forget it first: a kill mid-copy re-copies it
        copy_file(src / rel, dst / rel)
        copied[rel] = stamps[rel]
        write_atomic(dst / SYNC_MANIFEST, json.dumps(copied))
        done += sizes[rel]
        elapsed = time.monotonic() - t0
        if elapsed - shown > 30 or n + 1 == len(todo):
            shown, rate = elapsed, done / max(elapsed, 1e-9)
            log.info("copying %s to %s: %d/%d files, %.2f/%.2f GB, %.0f MB/s, ETA %.0f s", src, dst, n + 1,
                     len(todo), done / 1e9, total / 1e9, rate / 1e6, (total - done) / max(rate, 1.0))  # fmt: skip
    return total


def local_data_dir(data_dir: str | os.PathLike) -> str:
    """``data_dir`` itself when local; for an object store, the local folder its datasets are copied to."""
    if not is_url(data_dir):
        return os.fspath(data_dir)
    return os.path.join(default_cache_dir(), "datasets", os.fspath(workdir_path(data_dir)).split("://", 1)[1])


def stage(dataset: str, data_dir: str | os.PathLike) -> str:
    """The local data dir holding a copy of ``<data_dir>/<dataset>`` from an object store (array_record would read
    it in place at one request per random record): ``<cache>/datasets/<bucket>/<path>`` (``default_cache_dir``),
    brought up to date file by file."""
    url, local = workdir_path(data_dir), local_data_dir(data_dir)
    if (url / dataset).exists():
        copied = sync_folder(url / dataset, os.path.join(local, dataset))
        log.info("dataset %s from %s is in %s (%.2f GB copied now)", dataset, url, local, copied / 1e9)
    return local
