"""TFDS builders (array_record, no TensorFlow) for the small real datasets.

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
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

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
