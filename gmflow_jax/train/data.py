"""The trainer's data stream: global batches ``{'image', 'label'}`` sharded over the whole mesh.

``config.data.read``:

* ``'per_process'``: grain (``gmflow_jax.data.make_iterator``); each process reads its shard.
* ``'global'``: every process reads the whole global batch through grain and keeps its devices'
  rows, so the stream does not depend on the process layout (small data; exact multi-host tests).
* ``'device'``: the dataset is held whole on the devices (``gmflow_jax.data.device``).

All three have ``get_state`` / ``set_state`` and are checkpointed by grain's orbax handler.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from gmflow_jax.data import BatchIterator, make_iterator, make_loader
from gmflow_jax.data.device import DeviceBatches, load_arrays
from gmflow_jax.data.staging import local_data_dir
from gmflow_jax.models.factory import data_shape
from gmflow_jax.multihost import primary_first
from gmflow_jax.sharding import batch_spec_sharding


def check_data(config: ml_collections.ConfigDict, source: Any, workdir: str | None = None) -> None:
    """``ValueError`` naming the model fields if the dataset's examples do not fit the model.

    For a latent dataset (a source with ``metadata``: ``imagenet_latents``) also that it was encoded from
    ``config.data.image_size`` crops (unless 0) by the VAE of ``config.model.vae`` (unless ''; a relative
    path is relative to ``workdir``, else to the current directory).
    """
    metadata = getattr(source, "metadata", None)
    if metadata is not None:
        from gmflow_jax.data.imagenet import check_vae_match
        from gmflow_jax.models.vae import vae_folder

        vae = config.model.get("vae", "")
        check_vae_match(metadata, vae_folder(vae, workdir) if vae else "", config.data.image_size)
    shape = tuple(np.shape(source[0]["image"]))
    expected = data_shape(config.model)
    if shape != expected:
        fields = "model.channels" if config.model.kind == "toy" else "model.input_size / model.in_channels"
        raise ValueError(
            f"config.{fields} describe examples of shape {expected}, but dataset {config.data.dataset!r} has "
            f"examples of shape {shape}; expected the model to match the data."
        )


def make_data_iterator(
    config: ml_collections.ConfigDict, source: Any, mesh: jax.sharding.Mesh, data_dir: str
) -> BatchIterator | DeviceBatches:
    """Global batches ``{'image', 'label'}`` sharded over the whole mesh (see ``config.data.read``)."""
    d = config.data
    if d.read == "device":
        cache = os.path.join(local_data_dir(data_dir), "gmflow_device_arrays", d.dataset.replace("/", "_") + ".npz")
        images, labels = primary_first(lambda: load_arrays(source, cache), "gmflow_device_arrays")
        return DeviceBatches(images, labels, global_batch_size=config.batch_size, seed=config.seed, mesh=mesh)
    read_threads = 0 if isinstance(source, list | tuple) else 4
    if d.read == "per_process":
        return make_iterator(
            source,
            global_batch_size=config.batch_size,
            seed=config.seed,
            mesh=mesh,
            worker_count=d.worker_count,
            prefetch=d.prefetch,
            read_threads=read_threads,
        )
    # 'global': every process reads the same global batch and keeps the rows of its devices.
    loader = make_loader(
        source,
        local_batch_size=config.batch_size,
        seed=config.seed,
        process_index=0,
        process_count=1,
        worker_count=d.worker_count,
        read_threads=read_threads,
    )
    sharding = batch_spec_sharding(mesh)

    def assemble(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}

    return BatchIterator(loader, assemble, prefetch=d.prefetch)
