"""Small datasets held whole on every device, batches drawn by a jitted gather.

For the toy and digits experiments the grain pipeline's per-record Python cost (~0.1–0.5 ms a
record on a small CPU) dominates the step, so ``config.data.read = 'device'`` loads the dataset
once into a replicated device array and draws the batch of step ``s`` as
``randint(fold_in(key, s), (B,), 0, N)`` (with replacement), sharded over the batch axes. The
stream is a pure function of the seed and the step, independent of the process layout.
``DeviceBatches`` has the iterator interface the checkpoint code uses (``get_state`` /
``set_state`` / ``start_prefetch`` / ``close``); its state is just the step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from gmflow_jax.sharding import batch_spec_sharding, replicated

DATA_KEY_OFFSET = 0xDA7A
MAX_DEVICE_BYTES = 1 << 30  # refuse to hold more than 1 GiB of examples on every device


def load_arrays(source: Sequence[Any], cache_path: str | None = None, chunk: int = 8192) -> tuple[np.ndarray, ...]:
    """All examples of a random-access source: images (N, ...) float32, labels (N,) int32.

    With ``cache_path`` the arrays are kept in an ``.npz`` there (rebuilt if the length differs).
    """
    n = len(source)
    if cache_path and os.path.exists(cache_path):
        with np.load(cache_path) as f:
            if len(f["labels"]) == n:
                return f["images"], f["labels"]
    images, labels = [], []
    for lo in range(0, n, chunk):
        idx = list(range(lo, min(lo + chunk, n)))
        records = source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]
        images.append(np.stack([np.asarray(r["image"], np.float32) for r in records]))
        labels.append(np.asarray([r["label"] for r in records], np.int32))
    images, labels = np.concatenate(images), np.concatenate(labels)
    if cache_path:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tmp = cache_path + f".tmp{os.getpid()}.npz"
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cache_path)
        logging.info("cached %d examples in %s", n, cache_path)
    return images, labels


class DeviceBatches:
    """Global batches ``{'image', 'label'}`` gathered on device from a replicated copy of the dataset."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, global_batch_size: int, seed: int, mesh: Mesh):
        if images.nbytes > MAX_DEVICE_BYTES:
            raise ValueError(
                f"config.data.read='device' holds the whole dataset on every device; it has {images.nbytes} bytes, "
                f"expected at most {MAX_DEVICE_BYTES}. Use read='per_process'."
            )
        rep = replicated(mesh)
        self._images = jax.make_array_from_callback(images.shape, rep, lambda idx: images[idx])
        self._labels = jax.make_array_from_callback(labels.shape, rep, lambda idx: labels[idx])
        key = jax.random.fold_in(jax.random.PRNGKey(seed), DATA_KEY_OFFSET)
        n = images.shape[0]

        def gather(images: jax.Array, labels: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
            idx = jax.random.randint(jax.random.fold_in(key, step), (global_batch_size,), 0, n)
            return {"image": images[idx], "label": labels[idx]}

        self._gather = jax.jit(gather, out_shardings=batch_spec_sharding(mesh))
        self._step = 0

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = self._gather(self._images, self._labels, jnp.int32(self._step))
        self._step += 1
        return batch

    def get_state(self) -> bytes:
        return json.dumps({"device_batches_taken": self._step}).encode()

    def set_state(self, state: bytes) -> None:
        d = json.loads(state)
        if "device_batches_taken" not in d:
            raise ValueError(f"data state {state[:80]!r} was not written by config.data.read='device'")
        self._step = int(d["device_batches_taken"])

    def start_prefetch(self) -> None:
        pass

    def close(self) -> None:
        pass
