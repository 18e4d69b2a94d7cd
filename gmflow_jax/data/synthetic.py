"""Synthetic inputs for tests, benches and the ``:tiny`` configs: a tiny ImageNet-shaped folder of random
JPEGs and a diffusers VAE with random weights."""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import numpy as np


def write_synthetic_imagenet(
    folder: str | os.PathLike,
    num_synsets: int = 3,
    per_class: int = 6,
    seed: int = 0,
    sizes: tuple[int, int] = (20, 400),
) -> str:
    """A tiny ImageNet-shaped train folder of random JPEGs (height, width drawn from ``sizes``); returns it.

    Synset 0 holds a CMYK JPEG, synset 1 a grayscale one and synset 2 (if any) a corrupt file
    (``n*_corrupt.JPEG``: a cut-off JPEG), as the real ImageNet does.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for s in range(num_synsets):
        synset = f"n{1440764 + 1000 * s:08d}"
        os.makedirs(os.path.join(folder, synset), exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(*sizes, size=2))
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            if i == 0 and s == 0:
                image = image.convert("CMYK")
            elif i == 0 and s == 1:
                image = image.convert("L")
            image.save(os.path.join(folder, synset, f"{synset}_{i}.JPEG"), format="JPEG", quality=90)
        if s == 2:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
            with open(os.path.join(folder, synset, f"{synset}_corrupt.JPEG"), "wb") as f:
                f.write(buf.getvalue()[:300])
    return os.fspath(folder)


def write_random_vae(folder: str | os.PathLike, seed: int = 0, **config: Any) -> str:
    """Saves a diffusers ``AutoencoderKL`` with random weights (``torch.manual_seed(seed)``) to ``folder``.

    ``config``: ``VAEConfig`` fields overriding its defaults (sd-vae-ft-ema's architecture). Needs torch and
    diffusers (the test extras).
    """
    import torch
    from diffusers import AutoencoderKL

    from gmflow_jax.models.vae import VAEConfig

    kwargs = dict(dataclasses.asdict(VAEConfig(**config)))
    n = len(kwargs["block_out_channels"])
    torch.manual_seed(seed)
    AutoencoderKL(
        **kwargs, down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n
    ).save_pretrained(os.fspath(folder))
    return os.fspath(folder)
