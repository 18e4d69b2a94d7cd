"""Images → features, streamed in batches, batch-sharded over this process's devices, cached per chunk.

A *feature network* is a callable on uint8 ``(B, H, W, 3)`` NumPy images returning a dict of NumPy arrays
``{'pool': (B, D), 'logits': (B, L)}`` and optionally ``'spatial': (B, S)``, with attributes ``name`` (identifies
the network, its weights and input path; stored in reference files), ``resolution`` (the image size it accepts, or
None for any) and, for the FID Inception, ``input_transform`` (``'tf'`` or ``'pytorch-fid'``).
:class:`ShardedNetwork` makes one from an NNX module (the FID :class:`~.inception.InceptionV3`);
:mod:`~.digits_net` is one for the 8×8 digits.
"""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gmflow_jax.evaluate.metrics import hsv_saturation
from gmflow_jax.storage import open_npz, workdir_path, write_npz


class FeatureNetwork(Protocol):
    name: str
    resolution: tuple[int, int] | None

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


class ShardedNetwork:
    """An NNX feature module jitted over a 1-D ``('data',)`` mesh of the local devices (weights replicated, the
    batch split), called on fixed-size padded batches of ``batch_size`` so that it compiles once."""

    def __init__(self, module: nnx.Module, batch_size: int = 200):
        devices = jax.local_devices()
        self.name: str = module.name
        self.input_transform: str | None = getattr(module, "input_transform", None)
        self.resolution: tuple[int, int] | None = None  # the Inception resizes any input
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        mesh = Mesh(np.asarray(devices), ("data",))
        self._batch = NamedSharding(mesh, P("data"))
        graphdef, state = nnx.split(module)
        self._state = jax.device_put(state, NamedSharding(mesh, P()))
        self._fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x), out_shardings=self._batch)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (B, H, W, 3) → the module's outputs as NumPy arrays, in batches of ``batch_size``."""
        outs = []
        for i in range(0, len(images), self.batch_size):
            part = images[i : i + self.batch_size]
            padded = np.zeros((self.batch_size, *part.shape[1:]), part.dtype)
            padded[: len(part)] = part
            out = self._fn(self._state, jax.device_put(padded, self._batch))
            outs.append({k: np.asarray(v)[: len(part)] for k, v in out.items()})
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def lowered(self, image_shape: tuple[int, int, int]) -> Any:
        """The jitted network lowered for one batch of uint8 ``image_shape`` images (for cost analysis)."""
        spec = jax.ShapeDtypeStruct((self.batch_size, *image_shape), np.uint8, sharding=self._batch)
        return self._fn.lower(self._state, spec)


def check_resolution(net: FeatureNetwork, images_shape: tuple[int, ...], where: str) -> None:
    """ValueError naming both unless ``images_shape`` (N, H, W, 3) fits ``net`` (uint8 RGB at its resolution)."""
    if len(images_shape) != 4 or images_shape[-1] != 3:
        raise ValueError(f"{where}: images must have shape (N, H, W, 3); got {tuple(images_shape)}")
    if net.resolution is not None and tuple(images_shape[1:3]) != tuple(net.resolution):
        raise ValueError(
            f"{where}: images are {images_shape[1]}×{images_shape[2]}, but the feature network {net.name} takes "
            f"{net.resolution[0]}×{net.resolution[1]}"
        )


def npz_array_batches(path: str, key: str = "arr_0", batch: int = 1000) -> tuple[tuple[int, ...], Iterator]:
    """(shape, iterator of consecutive (≤ batch, ...) slices) of array ``key`` in an uncompressed ``.npz``,
    read a batch at a time (a 50K × 256² sample file is 9.8 GB) from a local, ``file://`` or ``gs://`` path."""
    file = workdir_path(path).open("rb")
    archive = zipfile.ZipFile(file)
    member = archive.open(f"{key}.npy")
    version = np.lib.format.read_magic(member)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"{path}: {key!r} is in .npy format version {version}; expected 1.0 or 2.0")
    shape, fortran, dtype = readers[version](member)
    if fortran or dtype != np.uint8:
        raise ValueError(f"{path}: {key!r} must be a C-ordered uint8 array; got {dtype}, fortran_order={fortran}")
    row = int(np.prod(shape[1:]))

    def batches() -> Iterator[np.ndarray]:
        with file, archive, member:
            for start in range(0, shape[0], batch):
                n = min(batch, shape[0] - start)
                data = member.read(n * row)
                if len(data) != n * row:
                    raise ValueError(f"{path}: {key!r} ends after {start} of {shape[0]} rows")
                yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])

    return tuple(shape), batches()


def features_of_batches(
    net: FeatureNetwork, batches: Iterator[np.ndarray], total: int, desc: str, every_s: float = 30.0
) -> dict[str, np.ndarray]:
    """Runs ``net`` over an iterator of uint8 batches (``total`` images in all), printing images/s and ETA."""
    outs, done, t0, last = [], 0, time.time(), time.time()
    for images in batches:
        outs.append(net(images))
        done += len(images)
        if time.time() - last > every_s or done == total:
            rate = done / max(time.time() - t0, 1e-9)
            print(f"{desc}: {done}/{total} images, {rate:.1f} images/s, ETA {(total - done) / rate:.0f} s", flush=True)
            last = time.time()
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def npz_features(net: FeatureNetwork, path: str, batch: int = 1000) -> dict[str, np.ndarray]:
    """The features of an ADM-format sample file (uint8 ``arr_0`` (N, H, W, 3)), read ``batch`` images at a time."""
    shape, batches = npz_array_batches(path, "arr_0", batch)
    check_resolution(net, shape, path)
    return features_of_batches(net, batches, shape[0], f"features of {os.path.basename(path)}")


def cached_features(
    net: FeatureNetwork, images: Callable[[], np.ndarray], path: str, where: str
) -> dict[str, np.ndarray]:
    """The features of ``images()`` and their mean HSV saturation (``saturation``, with ``count`` images) from
    ``path`` (an ``.npz`` with the network's name), computing and writing it (atomically) when absent or made by
    another network."""
    if workdir_path(path).exists():
        with open_npz(path) as f:
            if str(f["feature_network"][()]) == net.name:
                return {k: f[k] for k in f.files if k != "feature_network"}
    x = images()
    check_resolution(net, x.shape, where)
    out = dict(net(x), saturation=np.float64(hsv_saturation(x)), count=np.int64(len(x)))
    write_npz(path, feature_network=np.array(net.name), **out)
    return out


def feature_network(
    inception: str | None,
    preprocessing: str,
    batch_size: int,
    input_transform: str = "tf",
    use_inception: bool = False,
) -> FeatureNetwork | None:
    """The FID Inception with ``input_transform`` when ``inception`` (pytorch-fid's weights: a path or URL) is given
    or ``use_inception`` (then with the official weights, downloaded once); else the digits network for images with
    preprocessing 'digits'; else None (samples only)."""
    if inception or use_inception:
        from gmflow_jax.evaluate.features import ShardedNetwork
        from gmflow_jax.evaluate.inception import InceptionV3

        return ShardedNetwork(InceptionV3.from_pytorch_fid(inception, input_transform), batch_size)
    if preprocessing == "digits":
        from gmflow_jax.evaluate.digits_net import load_digits_net

        return load_digits_net()
    return None
