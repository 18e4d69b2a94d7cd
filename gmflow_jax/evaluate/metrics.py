"""Sample-quality metrics with the ADM evaluator's conventions (openai/guided-diffusion ``evaluations/evaluator.py``).

All functions take NumPy or JAX arrays. Feature extraction (InceptionV3 pool3 / spatial features and logits) is
not done here; these functions start from features, logits or uint8 images.

* :func:`frechet_distance` / :func:`feature_statistics` — FID (pool3, 2048-D) and sFID (spatial, 2023-D).
* :func:`inception_score` — IS from the 1008-way logits (ADM: pool3 features times the last layer's weights, no bias).
* :func:`precision_recall` — improved precision/recall (Kynkäänniemi et al. 2019), blocked k-NN on the default device.
* :func:`hsv_saturation` / :func:`saturation_difference` — the paper's colour-saturation measure.
* :func:`load_adm_reference` / :func:`save_reference` — the ADM reference-batch ``.npz`` format.
"""

from __future__ import annotations

import functools
import warnings
from typing import TypedDict

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special

from gmflow_jax.storage import open_npz, write_npz

__all__ = [
    "AdmReference",
    "check_same_preprocessing",
    "feature_statistics",
    "frechet_distance",
    "hsv_saturation",
    "inception_score",
    "load_adm_reference",
    "precision_recall",
    "saturation_difference",
    "save_reference",
]

ADM_PREPROCESSING = "adm"
"""What :func:`load_adm_reference` reports for files without a ``preprocessing`` entry (ADM's own batches)."""
POOL_DIM = 2048
SPATIAL_DIM = 2023  # ADM's sFID features: mixed_6/conv, first 7 channels of 17x17.


# ----------------------------------------------------------------------------------------------------------------
# FID / sFID


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D), float64, ``rowvar=False``, of (N, D) features (N >= 2)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy.linalg.sqrtm without its failure messages (old SciPy returns ``(root, err)`` with ``disp=False``)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        root = scipy.linalg.sqrtm(a)
    return root[0] if isinstance(root, tuple) else root


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance ‖mu1−mu2‖² + tr(σ1 + σ2 − 2 (σ1 σ2)^½) between N(mu1, σ1) and N(mu2, σ2).

    ``mu*``: (D,); ``sigma*``: (D, D). The square root is ``scipy.linalg.sqrtm`` in float64 on the host. As in the
    ADM evaluator: if the root of the product is not finite, ``eps·I`` is added to both covariances (with a warning);
    a complex result whose diagonal has an imaginary part above 1e-3 is refused, a smaller one is dropped.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1:
        raise ValueError(f"mu1 must be 1-D, got shape {mu1.shape}")
    d = mu1.shape[0]
    if mu2.shape != (d,):
        raise ValueError(f"mu2 has shape {mu2.shape}, expected {(d,)} like mu1")
    if sigma1.shape != (d, d):
        raise ValueError(f"sigma1 has shape {sigma1.shape}, expected {(d, d)} to match mu1")
    if sigma2.shape != (d, d):
        raise ValueError(f"sigma2 has shape {sigma2.shape}, expected {(d, d)} to match mu1")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: singular product; adding {eps} to the covariances' diagonals", stacklevel=2)
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score of (N, C) classifier logits: mean and std over ``splits`` parts of exp(E_x KL(p(y|x) ‖ p(y))).

    Part i is rows ``[i·N // splits, (i+1)·N // splits)`` (equal parts when ``splits`` divides N; ADM uses parts of
    5000 of 50,000, i.e. ``splits=10``). p(y) is the part's mean of p(y|x). Softmax and KL are float64 on the host.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {z.shape}")
    if splits < 1 or z.shape[0] < splits:
        raise ValueError(f"need 1 <= splits <= N, got splits={splits} for N={z.shape[0]}")
    logp = z - scipy.special.logsumexp(z, axis=1, keepdims=True)
    p = np.exp(logp)
    n = z.shape[0]
    scores = []
    for i in range(splits):
        part_p, part_logp = p[i * n // splits : (i + 1) * n // splits], logp[i * n // splits : (i + 1) * n // splits]
        log_py = np.log(part_p.mean(axis=0, keepdims=True))
        kl = np.where(part_p > 0, part_p * (part_logp - log_py), 0.0).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------------------------
# Improved precision / recall


def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    """(Ba, Bb) squared distances, float32, ‖a‖² − 2ab + ‖b‖² clamped at 0 (the ADM / Kynkäänniemi formula)."""
    na = jnp.sum(a * a, axis=1)[:, None]
    nb = jnp.sum(b * b, axis=1)[None, :]
    ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(na - 2.0 * ab + nb, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _radii_rows(rows: jax.Array, blocks: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """Squared distance to the (k+1)-th nearest point (self included) of each of (B, D) ``rows`` among the valid
    points of ``blocks`` (nb, Bc, D); merged blockwise with ``top_k`` on negated distances."""
    kk = min(k + 1, blocks.shape[1])

    def step(best, xs):
        block, ok = xs
        d = jnp.where(ok[None, :], _sq_dists(rows, block), jnp.inf)
        cand = jax.lax.top_k(-d, kk)[0]
        return jax.lax.top_k(jnp.concatenate([best, cand], axis=1), k + 1)[0], None

    init = jnp.full((rows.shape[0], k + 1), -jnp.inf, jnp.float32)
    best, _ = jax.lax.scan(step, init, (blocks, valid))
    return -best[:, k]


@jax.jit
def _membership_rows(rows, rows_radii, blocks, blocks_radii):
    """For (B, D) ``rows`` of set A and (nb, Bc, D) ``blocks`` of set B: (B,) whether each row is inside B's manifold
    and (nb, Bc) whether each B point is inside the manifold of these rows (d² <= r², as ADM)."""

    def step(rows_in, xs):
        block, block_radii = xs
        d = _sq_dists(rows, block)
        rows_in = rows_in | jnp.any(d <= block_radii[None, :], axis=1)
        return rows_in, jnp.any(d <= rows_radii[:, None], axis=0)

    return jax.lax.scan(step, jnp.zeros(rows.shape[0], bool), (blocks, blocks_radii))


def _blocked(x: np.ndarray, b: int) -> tuple[jax.Array, jax.Array]:
    """(N, D) → zero-padded (nb, b, D) float32 blocks on the default device and the (nb, b) validity mask."""
    n, d = x.shape
    nb = -(-n // b)
    pad = np.zeros((nb * b, d), np.float32)
    pad[:n] = x
    valid = np.zeros(nb * b, bool)
    valid[:n] = True
    return jnp.asarray(pad.reshape(nb, b, d)), jnp.asarray(valid.reshape(nb, b))


def _manifold_radii(blocks: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """(nb, b) squared k-NN radii (self excluded); padded points get −1 so that nothing is inside their ball."""
    radii = jnp.stack([_radii_rows(blocks[i], blocks, valid, k) for i in range(blocks.shape[0])])
    return jnp.where(valid, radii, -1.0)


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 10000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as the ADM evaluator computes them.

    ``real_features``: (N_r, D), ``fake_features``: (N_f, D). A set's manifold is the union of closed balls around
    its points whose squared radius is the squared distance to the k-th nearest other point of the same set (ADM: the
    (k+1)-th smallest including the point itself). precision = fraction of fake points inside the real manifold,
    recall = fraction of real points inside the fake manifold.

    Squared distances are computed in (batch_size, batch_size) blocks with jnp on the default device, in float32 with
    ‖a‖² − 2ab + ‖b‖² clamped at 0 (ADM computes the same formula in float16, falling back to float32 on overflow;
    float32 is at least as accurate). Peak memory is a few (batch_size, batch_size) float32 blocks.
    """
    real = np.asarray(real_features, dtype=np.float32)
    fake = np.asarray(fake_features, dtype=np.float32)
    if real.ndim != 2:
        raise ValueError(f"real_features must have shape (N, D), got {real.shape}")
    if fake.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(f"fake_features must have shape (N, {real.shape[1]}), got {fake.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for name, x in (("real_features", real), ("fake_features", fake)):
        if x.shape[0] < k + 1:
            raise ValueError(f"{name} has {x.shape[0]} points, need at least k + 1 = {k + 1}")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains non-finite values")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    real_blocks, real_valid = _blocked(real, min(batch_size, real.shape[0]))
    fake_blocks, fake_valid = _blocked(fake, min(batch_size, fake.shape[0]))
    real_radii = _manifold_radii(real_blocks, real_valid, k)
    fake_radii = _manifold_radii(fake_blocks, fake_valid, k)

    real_in = []
    fake_in = jnp.zeros(fake_valid.shape, bool)
    for i in range(real_blocks.shape[0]):
        rows_in, block_in = _membership_rows(real_blocks[i], real_radii[i], fake_blocks, fake_radii)
        real_in.append(rows_in)
        fake_in = fake_in | block_in
    real_in = np.asarray(jnp.stack(real_in))[np.asarray(real_valid)]
    fake_in = np.asarray(fake_in)[np.asarray(fake_valid)]
    return float(fake_in.mean()), float(real_in.mean())


# ----------------------------------------------------------------------------------------------------------------
# Colour saturation


def hsv_saturation(images, chunk: int = 256) -> float:
    """Mean HSV saturation (max − min) / max (0 where max = 0) over all pixels of uint8 (N, H, W, 3) RGB images."""
    if isinstance(images, jax.Array):
        images = np.asarray(images)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"images must be a uint8 array, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images must have shape (N >= 1, H, W, 3), got {images.shape}")
    total = 0.0
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk]
        mx = x.max(axis=-1).astype(np.float64)
        mn = x.min(axis=-1).astype(np.float64)
        total += np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0).sum()
    return float(total / (images.shape[0] * images.shape[1] * images.shape[2]))


def saturation_difference(samples, real) -> float:
    """hsv_saturation(samples) − hsv_saturation(real): the paper's colour-saturation measure (> 0: over-saturated)."""
    return hsv_saturation(samples) - hsv_saturation(real)


# ----------------------------------------------------------------------------------------------------------------
# Reference batches


class AdmReference(TypedDict):
    """Contents of an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz`` and the like)."""

    images: np.ndarray | None  # uint8 (N, H, W, 3), ``arr_0``; None when absent or not loaded
    mu: np.ndarray  # float64 (2048,)  pool3 mean
    sigma: np.ndarray  # float64 (2048, 2048)
    mu_s: np.ndarray  # float64 (2023,)  spatial mean (sFID)
    sigma_s: np.ndarray  # float64 (2023, 2023)
    preprocessing: str  # 'adm' for ADM's own files


def _check_stats(where: str, stats: dict, dims: tuple[int, int] | None) -> None:
    for mu_key, sigma_key, want in (("mu", "sigma", dims and dims[0]), ("mu_s", "sigma_s", dims and dims[1])):
        mu, sigma = stats[mu_key], stats[sigma_key]
        if mu.ndim != 1 or (want is not None and mu.shape[0] != want):
            raise ValueError(f"{where}: {mu_key!r} has shape {mu.shape}, expected ({want if want else 'D'},)")
        if sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{where}: {sigma_key!r} has shape {sigma.shape}, expected {(mu.shape[0],) * 2}")


def _check_images(where: str, images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{where}: 'arr_0' must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")


def load_adm_reference(
    path, *, load_images: bool = True, dims: tuple[int, int] | None = (POOL_DIM, SPATIAL_DIM)
) -> AdmReference:
    """Reads an ADM reference batch: ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` (float64) and ``arr_0`` (optional).

    ``dims``: the expected (pool, spatial) feature sizes, (2048, 2023) for ADM's InceptionV3; None accepts any.
    ``load_images=False`` skips ``arr_0`` (ImageNet 256's batch is 10,000 images, ~2 GB). The returned
    ``preprocessing`` is the file's ``preprocessing`` string, or 'adm' when the file has none (ADM's own files).
    """
    with open_npz(path) as f:
        keys = set(f.files)
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            if key not in keys:
                raise ValueError(f"{path}: not an ADM reference batch, missing key {key!r} (has {sorted(keys)})")
        stats = {key: np.asarray(f[key], dtype=np.float64) for key in ("mu", "sigma", "mu_s", "sigma_s")}
        _check_stats(str(path), stats, dims)
        images = None
        if load_images and "arr_0" in keys:
            images = f["arr_0"]
            _check_images(str(path), images)
        preprocessing = str(f["preprocessing"][()]) if "preprocessing" in keys else ADM_PREPROCESSING
    return AdmReference(images=images, preprocessing=preprocessing, **stats)


def save_reference(
    path,
    *,
    mu,
    sigma,
    mu_s,
    sigma_s,
    images=None,
    preprocessing: str,
    dims: tuple[int, int] | None = (POOL_DIM, SPATIAL_DIM),
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Writes a reference batch in the ADM format (readable by ADM's evaluator) plus a ``preprocessing`` string
    (and the arrays of ``extra``: :mod:`gmflow_jax.evaluate.reference` stores its fields there).

    ``preprocessing`` names how the images were made (e.g. 'adm' for ADM's centre crop); statistics computed with
    different preprocessing must never be compared (:func:`check_same_preprocessing`). Writes exactly ``path``
    (atomically; local, ``file://`` or ``gs://``).
    """
    if not isinstance(preprocessing, str) or not preprocessing:
        raise ValueError(f"preprocessing must be a non-empty string, got {preprocessing!r}")
    stats = {
        "mu": np.asarray(mu, np.float64),
        "sigma": np.asarray(sigma, np.float64),
        "mu_s": np.asarray(mu_s, np.float64),
        "sigma_s": np.asarray(sigma_s, np.float64),
    }
    _check_stats(str(path), stats, dims)
    arrays = dict(stats, preprocessing=np.array(preprocessing), **(extra or {}))
    if images is not None:
        images = np.asarray(images)
        _check_images(str(path), images)
        arrays["arr_0"] = images
    write_npz(path, **arrays)


def check_same_preprocessing(a: str, b: str) -> None:
    """Raises ValueError naming both when two statistics' preprocessing strings differ."""
    if a != b:
        raise ValueError(f"preprocessing differs: {a!r} vs {b!r}; never mix statistics computed with different ones")
