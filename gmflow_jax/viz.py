"""Pictures of samples: image grids (one class per row), 2-D point histograms, PNG files."""

from __future__ import annotations

import io
import os

import numpy as np

HIST_RANGE = 4.5  # 2-D histogram covers [-4.5, 4.5]² (the checkerboard is [-4, 4]²)
HIST_BINS = 128


def render(samples: np.ndarray, rows: int) -> np.ndarray:
    """Samples -> (H, W, 3) uint8: an image grid with ``rows`` rows, or a log-density histogram of 2-D points."""
    samples = np.asarray(samples, np.float32)
    if samples.ndim == 2:
        hist, _, _ = np.histogram2d(
            samples[:, 1], samples[:, 0], bins=HIST_BINS, range=[[-HIST_RANGE, HIST_RANGE], [-HIST_RANGE, HIST_RANGE]]
        )
        img = np.log1p(hist[::-1])  # y up
        img = img / max(img.max(), 1e-8)
        img = np.kron(img, np.ones((2, 2)))
        return np.repeat((255 * img).astype(np.uint8)[..., None], 3, axis=-1)
    n, h, w, c = samples.shape
    if c >= 3:
        pix = samples[..., :3]
    else:
        pix = np.repeat(samples[..., :1], 3, axis=-1)
    pix = np.clip((pix + 1.0) / 2.0, 0.0, 1.0)  # data in [-1, 1]
    cols = n // rows
    pad = 1
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.float32)
    for i in range(rows * cols):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = pix[i]
    scale = max(1, 512 // grid.shape[0])
    grid = np.kron(grid, np.ones((scale, scale, 1)))
    return (255 * grid).astype(np.uint8)


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Writes an (H, W, 3) uint8 image as PNG (atomically), to a local, ``file://`` or ``gs://`` path."""
    from PIL import Image

    from gmflow_jax.storage import workdir_path, write_atomic

    target = workdir_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = io.BytesIO()
    Image.fromarray(image).save(data, format="PNG")
    write_atomic(target, data.getvalue())


def save_grid_png(samples: np.ndarray, path: str, rows: int, title: str | None = None, min_height: int = 480) -> None:
    """Writes samples as a PNG: images (N, H, W, C) in [-1, 1] as a ``rows`` × N/rows grid (upscaled to at
    least ``min_height`` pixels), or 2-D points (N, 2) as a log-density histogram; ``title`` on top."""
    from PIL import Image, ImageDraw, ImageFont

    img = render(samples, rows)
    scale = max(1, -(-min_height // img.shape[0]))
    img = np.kron(img, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else img
    if title:
        font = ImageFont.load_default(size=max(14, img.shape[1] // 40))
        pad = int(font.size * 1.8)
        canvas = Image.new("RGB", (img.shape[1], img.shape[0] + pad), "white")
        canvas.paste(Image.fromarray(img), (0, pad))
        ImageDraw.Draw(canvas).text((6, pad // 5), title, fill="black", font=font)
        img = np.asarray(canvas)
    save_png(img, path)
