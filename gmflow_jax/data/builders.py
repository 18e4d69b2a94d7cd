"""TFDS builders (array_record, no TensorFlow) for the small real datasets, and ``load_source``.

Datasets, one ``train`` split each:

* ``digits``: the 1797 8×8 handwritten digits shipped with scikit-learn
  (``sklearn.datasets.load_digits``), in sklearn's order. Features ``image`` float32 ``(8, 8, 1)``
  scaled from 0..16 to [-1, 1] (``v / 8 - 1``) and ``label`` int64 in 0..9.
* ``checkerboard`` (= ``checkerboard/1m``; ``checkerboard/64k`` is a 2**16-point config for tests):
  ``CHECKERBOARD_SIZE`` = 2**20 points drawn uniformly from the 8 white squares of a
  4×4 board covering [-4, 4]² (``checkerboard_sample`` with seed ``CHECKERBOARD_SEED``).
  Features ``image`` float32 ``(2,)`` (the point; named like the digits' feature so that one
  pipeline serves both) and ``label`` int64, always 0.

Checkerboard parity: the board has 2×2 squares; with cell coordinates ``c = floor(x / 2)`` in
{-2, -1, 0, 1}², a square is *white* iff ``c_0 + c_1`` is even. So the square [0, 2)² (containing
(+1, +1), i.e. (+0.5, +0.5) in unit-cell coordinates) is white, as in the FFJORD / GMFlow toy
checkerboard.

Building happens on first use into the given ``data_dir`` (``<data_dir>/<name>/<version>``);
later calls reuse the files. ``imagenet_latents`` (``gmflow_jax.data.imagenet``) is the exception: it is
built once by ``python -m gmflow_jax.data.build_imagenet`` and only read here. Nothing is downloaded
and GCS is never consulted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gmflow_jax.cache import default_cache_dir
from gmflow_jax.checkpoint import copy_file, file_sizes, is_url, workdir_path, write_atomic

CHECKERBOARD_SIZE = 1 << 20
CHECKERBOARD_SEED = 0
_CELL = 2.0  # side of one square: 8 / 4

log = logging.getLogger(__name__)

# (column, row) cell indices, in {-2, -1, 0, 1}, of the 8 white squares; sorted, fixed order.
WHITE_SQUARES = np.array([(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0], dtype=np.int64)


def checkerboard_cell(points: np.ndarray) -> np.ndarray:
    """Index in ``WHITE_SQUARES`` of the square holding each point, or -1: (N, 2) -> (N,) int64."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[-1] != 2:
        raise ValueError(f"checkerboard points must have shape (N, 2), got {points.shape}")
    cells = np.floor(points / _CELL).astype(np.int64)  # squares are half-open: [-4, 4)² is the board
    match = np.all(cells[:, None, :] == WHITE_SQUARES[None, :, :], axis=-1)  # (N, 8)
    return np.where(match.any(axis=-1), match.argmax(axis=-1), -1)


def checkerboard_inside(points: np.ndarray) -> np.ndarray:
    """Whether each point lies in a white square of the [-4, 4)² board: (N, 2) -> (N,) bool."""
    return checkerboard_cell(points) >= 0


def checkerboard_sample(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` points uniform on the 8 white squares: -> (n, 2) float32 in [-4, 4)²."""
    square = rng.integers(0, len(WHITE_SQUARES), size=n)
    offset = rng.uniform(0.0, 1.0, size=(n, 2))
    return ((WHITE_SQUARES[square] + offset) * _CELL).astype(np.float32)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits scaled to [-1, 1]: images (1797, 8, 8, 1) float32, labels (1797,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    return images, digits.target.astype(np.int64)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base for our builders: no registration in TFDS's global registry, no checksums file.

    ``code_path`` is overridden because TFDS 4.9.10's implementation imports ``importlib_resources``
    (declared only for Python < 3.9, so absent here); it only serves to locate a download-checksums
    file, which these builders (nothing to download) do not have.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        return None

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager
        return {"train": self._generate_examples()}


class Digits(_LocalBuilder, skip_registration=True):
    """scikit-learn's 8×8 digits: ``image`` (8, 8, 1) float32 in [-1, 1], ``label`` in 0..9."""

    name = "digits"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn.datasets.load_digits, scaled to [-1, 1]."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=type(self).__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        images, labels = digits_arrays()
        for i in range(len(labels)):
            yield i, {"image": images[i], "label": int(labels[i])}


@dataclasses.dataclass(eq=False)
class CheckerboardConfig(tfds.core.BuilderConfig):
    """How many points to draw (seed ``CHECKERBOARD_SEED``)."""

    num_points: int = CHECKERBOARD_SIZE


class Checkerboard(_LocalBuilder, skip_registration=True):
    """2-D checkerboard: ``image`` (2,) float32 points in [-4, 4]², ``label`` always 0.

    Configs: ``1m`` (default, 2**20 points) and ``64k`` (2**16 points, for tests and quick runs).
    """

    name = "checkerboard"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Uniform on the white squares (floor(x/2) sums even), seed 0."}
    BUILDER_CONFIGS = [
        CheckerboardConfig(name="1m", description="2**20 points", num_points=1 << 20),
        CheckerboardConfig(name="64k", description="2**16 points", num_points=1 << 16),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=type(self).__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                    "label": tfds.features.ClassLabel(num_classes=1),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        n = self.builder_config.num_points
        points = checkerboard_sample(np.random.default_rng(CHECKERBOARD_SEED), n)
        for i in range(n):
            yield i, {"image": points[i], "label": 0}


BUILDERS: dict[str, type[_LocalBuilder]] = {"digits": Digits, "checkerboard": Checkerboard}
KNOWN_DATASETS: tuple[str, ...] = ("checkerboard", "checkerboard/1m", "checkerboard/64k", "digits", "imagenet_latents")


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


def get_builder(name: str, data_dir: str | os.PathLike) -> tfds.core.GeneratorBasedBuilder:
    """The array_record builder for ``name`` (``'dataset'`` or ``'dataset/config'``) at ``data_dir``.

    The dataset is built there on first use (``<data_dir>/<dataset>[/<config>]/<version>``) and
    reused afterwards, except ``imagenet_latents`` (built by ``gmflow_jax.data.build_imagenet``).
    A ``gs://`` ``data_dir`` is read through a local copy (``stage``). Raises ``ValueError`` for unknown names,
    a missing ``data_dir`` or an unbuilt ``imagenet_latents``.
    """
    if not isinstance(name, str) or name not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}")
    if data_dir is None or not os.fspath(data_dir):
        raise ValueError(f"dataset {name!r} needs a data_dir to build into and read from, got {data_dir!r}")
    dataset, _, config = name.partition("/")
    if is_url(data_dir):
        if dataset == "imagenet_latents" and not (workdir_path(data_dir) / dataset).exists():
            from gmflow_jax.data import imagenet

            raise ValueError(f"dataset {name!r} is not built in {data_dir}; build it with: {imagenet.BUILD_COMMAND}")
        data_dir = stage(dataset, data_dir)
    if dataset == "imagenet_latents":
        from gmflow_jax.data import imagenet

        with _quiet():
            builder = imagenet.ImagenetLatents(data_dir=os.fspath(data_dir), file_format="array_record")
        if not builder.is_prepared():
            raise ValueError(
                f"dataset {name!r} is not built in {os.fspath(data_dir)}; build it with: {imagenet.BUILD_COMMAND}"
            )
        return builder
    with _quiet():
        builder = BUILDERS[dataset](data_dir=os.fspath(data_dir), config=config or None, file_format="array_record")
        if not builder.is_prepared():
            log.info("building TFDS dataset %s into %s", name, builder.data_dir)
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False), file_format="array_record"
            )
    return builder


def load_source(name: str, data_dir: str | os.PathLike, split: str = "train") -> Sequence[dict[str, Any]]:
    """Random-access source (``len``, ``[i]``) of ``{'image': ndarray, 'label': int}`` records.

    ``name`` is one of ``KNOWN_DATASETS``; built into ``data_dir`` on first use. What grain reads.
    ``imagenet_latents`` records are read as ``{'image': latent, 'label'}`` (a ``LatentSource``, with
    the dataset's ``metadata``).
    """
    builder = get_builder(name, data_dir)
    if split not in builder.info.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {sorted(builder.info.splits)}")
    source = builder.as_data_source(split=split)
    if name == "imagenet_latents":
        from gmflow_jax.data.imagenet import LatentSource

        return LatentSource(source, dict(builder.info.metadata))
    return source


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence TFDS's prints, progress bars and absl info/warnings (e.g. "no dataset_info.json")."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    tfds.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logger.setLevel(level)
