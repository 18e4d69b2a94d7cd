"""Reading the built ``imagenet_latents`` dataset: ``LatentSource``, the fast record parser grain reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tensorflow_datasets.proto import tf_example_pb2


class LatentSource(Sequence):
    """A TFDS data source of ``imagenet_latents`` read as ``{'image': latent, 'label'}`` + ``metadata``.

    Records with the builder's features (``latent`` a float32 tensor stored as a float list, ``label``
    an int64) are parsed straight from the array_record bytes (``_plain_latent_shape``): the values
    TFDS's generic decode gives (``latent`` float32 ``(S/f, S/f, C)``, ``label`` an int) at a fraction
    of its per-record cost; any other source is decoded by TFDS.
    """

    def __init__(self, source: Any, metadata: dict[str, Any]):
        self.source = source
        self.metadata = metadata
        self._shape = _plain_latent_shape(source)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._shape is not None:
            return self._parse(self.source.data_source[index])
        record = self.source[index]
        return {"image": record["latent"], "label": record["label"]}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        if self._shape is not None:  # record by record: array_record's own batch read starts threads per call
            raw = self.source.data_source
            return [self._parse(raw[i]) for i in indices]
        return [{"image": r["latent"], "label": r["label"]} for r in self.source.__getitems__(indices)]

    def _parse(self, data: bytes) -> dict[str, Any]:
        """A serialized ``tf.train.Example`` -> ``{'image': (S/f, S/f, C) float32, 'label': int}``."""
        feature = tf_example_pb2.Example.FromString(data).features.feature
        latent = np.array(feature["latent"].float_list.value, dtype=np.float32).reshape(self._shape)
        return {"image": latent, "label": feature["label"].int64_list.value[0]}

    def __repr__(self) -> str:  # grain validates a restored iterator against repr(source)
        return f"LatentSource({self.source!r})"


def _plain_latent_shape(source: Any) -> tuple[int, ...] | None:
    """The latent shape if ``source`` is a TFDS array_record source of the builder's plain features, else None."""
    info = getattr(source, "dataset_info", None)
    if (
        info is None
        or not hasattr(source, "data_source")
        or getattr(source, "decoders", None) is not None
        or getattr(getattr(source, "deserialize_method", None), "name", None) != "DESERIALIZE_AND_DECODE"
    ):
        return None
    serialized = info.features.get_serialized_info()
    if set(serialized) != {"latent", "label"}:
        return None
    latent, label = serialized["latent"], serialized["label"]
    shape = tuple(latent.shape)
    plain = (
        np.dtype(latent.np_dtype) == np.float32
        and np.dtype(label.np_dtype) == np.int64
        and tuple(label.shape) == ()
        and all(isinstance(d, int) for d in shape)
        and tuple(info.features["latent"].shape) == shape
        and not getattr(latent, "sequence_rank", 0)
        and not getattr(label, "sequence_rank", 0)
    )
    return shape if plain else None
