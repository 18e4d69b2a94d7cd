"""What grain reads: ``load_source`` (and ``get_builder``) for every name in ``KNOWN_DATASETS``: the small
datasets of ``gmflow_jax.data.builders`` built on first use, ``imagenet_latents`` (``gmflow_jax.data.imagenet``)
built once beforehand; a ``gs://`` ``data_dir`` through a local copy (``gmflow_jax.data.staging``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from gmflow_jax.data.builders import BUILDERS, _quiet
from gmflow_jax.data.staging import stage
from gmflow_jax.storage import is_url, workdir_path

log = logging.getLogger(__name__)

KNOWN_DATASETS: tuple[str, ...] = ("checkerboard", "checkerboard/1m", "checkerboard/64k", "digits", "imagenet_latents")


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
        from gmflow_jax.data.latent_source import LatentSource

        return LatentSource(source, dict(builder.info.metadata))
    return source
