"""ImageNet train images as files: listing a source (folders or tars, local or ``gs://``) and the per-image
recipe (decode, RGB, ADM centre crop, the seeded horizontal flip) that ``gmflow_jax.data.imagenet`` encodes."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import tarfile
from typing import Any

import numpy as np

from gmflow_jax.storage import workdir_path

SYNSET = re.compile(r"^n\d{8}$")
SYNSET_TAR = re.compile(r"^(n\d{8})\.tar$")


# --- the per-image recipe ----------------------------------------------------------------


def center_crop(image: Any, size: int) -> np.ndarray:
    """ADM (guided-diffusion) centre crop of a PIL RGB image: -> (size, size, 3) uint8.

    Halve with BOX filtering while the short side is at least ``2·size``, resize with BICUBIC so that the
    short side is ``size`` (the long side rounded), then cut the centre square (offsets rounded down).
    """
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def flip_for(seed: int, index: int) -> bool:
    """Whether image ``index`` is flipped horizontally: a fixed function of (seed, index), half of them."""
    return hashlib.sha256(f"{seed}:{index}".encode()).digest()[0] & 1 == 1


def load_image(data: bytes, size: int, flip: bool) -> np.ndarray | None:
    """Encoded image bytes -> (size, size, 3) uint8 (RGB, ADM crop, optional flip); None if it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
        arr = center_crop(rgb, size)
    except Exception:  # PIL raises many types for corrupt files (OSError, SyntaxError, ValueError, ...)
        return None
    return np.ascontiguousarray(arr[:, ::-1] if flip else arr)


# --- the source: a folder of synset folders or (a folder of / a tar of) per-synset tars --------


@dataclasses.dataclass(frozen=True, slots=True)
class ImageRef:
    """One image file: its synset ``label``, ``name`` ('n01440764/x.JPEG') and bytes in ``path`` at ``offset``."""

    label: int
    name: str
    path: str
    offset: int = 0
    size: int = -1  # -1: the whole file

    def read(self) -> bytes:
        with workdir_path(self.path).open("rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def _tar_members(path: str, base: int, fileobj: Any = None) -> list[tuple[str, int, int]]:
    """(basename, absolute data offset, size) of the regular files of a tar (at byte ``base`` of ``path``)."""
    with tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj) as tar:
        return [
            (os.path.basename(m.name), base + m.offset_data, m.size)
            for m in tar
            if m.isfile() and not os.path.basename(m.name).startswith(".")
        ]


def list_images(source: str | os.PathLike) -> tuple[list[str], list[ImageRef]]:
    """Sorted synsets and the images of an ImageNet train set, in dataset order (synset, then file name).

    ``source``: the ``ILSVRC2012_img_train`` folder of synset folders (``n01440764/*.JPEG``), a folder of
    per-synset tars (``n01440764.tar``) or the official ``ILSVRC2012_img_train.tar`` (a tar of those); local,
    ``file://`` or ``gs://`` (read in place: tars by their members' offsets). ``ValueError`` if it does not
    exist or holds neither.
    """
    root = workdir_path(source)
    path = str(root)
    tars: dict[str, list[tuple[str, int, int]]] = {}
    files: dict[str, list[str]] = {}
    if root.is_file():
        with root.open("rb") as f:
            if not tarfile.is_tarfile(f):
                raise ValueError(
                    f"--source {path} is a file but not a tar; expected ILSVRC2012_img_train.tar or a folder."
                )
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:") as outer:
                for m in outer:
                    match = SYNSET_TAR.match(os.path.basename(m.name))
                    if m.isfile() and match:
                        tars[match.group(1)] = _tar_members(path, m.offset_data, outer.extractfile(m))
    elif root.is_dir():
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if SYNSET.match(entry.name) and entry.is_dir():
                files[entry.name] = sorted(p.name for p in entry.iterdir() if not p.name.startswith("."))
            elif SYNSET_TAR.match(entry.name) and entry.is_file():
                with entry.open("rb") as f:
                    tars[entry.name[:-4]] = _tar_members(str(entry), 0, f)
    else:
        raise ValueError(f"--source {path} does not exist; expected the ImageNet train folder or tar.")
    if files and tars:
        raise ValueError(f"--source {path} holds both synset folders and synset tars; expected one kind.")
    if not files and not tars:
        raise ValueError(
            f"--source {path} holds no synset folders (n01440764/) or tars (n01440764.tar); expected an ImageNet "
            "train set (ILSVRC2012_img_train)."
        )
    synsets = sorted(files or tars)
    refs: list[ImageRef] = []
    for label, synset in enumerate(synsets):
        if files:
            refs += [ImageRef(label, f"{synset}/{n}", str(root / synset / n)) for n in files[synset]]
        else:
            container = path if not files and root.is_file() else str(root / f"{synset}.tar")
            refs += [ImageRef(label, f"{synset}/{n}", container, o, s) for n, o, s in sorted(tars[synset])]
    return synsets, refs
