"""Datasets (TFDS array_record builders) and the grain pipeline that turns them into global batches."""

from gmflow_jax.data.builders import (
    WHITE_SQUARES,
    checkerboard_cell,
    checkerboard_inside,
    checkerboard_sample,
    digits_arrays,
)
from gmflow_jax.data.imagenet import ImagenetLatents
from gmflow_jax.data.latent_source import LatentSource
from gmflow_jax.data.pipeline import BatchIterator, batch_sharding, make_iterator, make_loader
from gmflow_jax.data.sources import KNOWN_DATASETS, get_builder, load_source

__all__ = [
    "KNOWN_DATASETS",
    "WHITE_SQUARES",
    "BatchIterator",
    "ImagenetLatents",
    "LatentSource",
    "batch_sharding",
    "checkerboard_cell",
    "checkerboard_inside",
    "checkerboard_sample",
    "digits_arrays",
    "get_builder",
    "load_source",
    "make_iterator",
    "make_loader",
]
