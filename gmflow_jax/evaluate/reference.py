"""Reference statistics of real images: the ADM batch (``VIRTUAL_imagenet256_labeled.npz``) or one made here.

    python -m gmflow_jax.evaluate.reference --images DIR_OR_NPZ --out REF.npz [--resolution 256] \
        [--input_transform tf|pytorch-fid] [--inception FILE_OR_URL]
    python -m gmflow_jax.evaluate.reference --images digits --out REF.npz           # the 8×8 digits of `make demo`

A reference holds what the metrics compare samples against: the Gaussian statistics of the real ``pool`` features
(FID) and ``spatial`` features (sFID), the real ``pool`` features themselves (Precision/Recall), the mean HSV
saturation of the real images, and how they were made: ``preprocessing`` (``'adm'``: the ADM centre crop;
``'digits'``: scikit-learn's digits as the trainer sees them), ``feature_network`` (the network's name: the
Inception's weights file, the digits network's parameter hash), ``input_transform`` (the Inception's input path,
``'tf'`` or ``'pytorch-fid'``: :mod:`~.inception`; none for the digits network), ``resolution`` and ``min_samples``
(the number of samples a faithful comparison needs: 50,000 for the ADM batch, as the paper's protocol).
Files are the ADM format plus those fields, so ADM's evaluator reads ours. An ADM batch's statistics were made by
the TF graph: its input transform is ``'tf'``.

:func:`load_reference` reads either kind; an ADM batch has only statistics and images, so its ``pool`` features and
saturation are computed here from its ``arr_0`` (with the FID Inception) and cached beside the evaluation's output.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

from gmflow_jax.cache import local_copy
from gmflow_jax.evaluate import metrics
from gmflow_jax.evaluate.features import FeatureNetwork, check_resolution, features_of_batches, npz_array_batches
from gmflow_jax.storage import file_size, open_npz, workdir_path, write_npz

ADM_MIN_SAMPLES = 50_000
INCEPTION_FAMILY = "inception-v3-fid"  # ADM's batches were made with the TF graph whose weights pytorch-fid ports
ADM_INPUT_TRANSFORM = "tf"  # ... fed at ExpandDims:0, through the graph's own resize and normalisation
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass
class Reference:
    """What the metrics need of the real images (module docstring); ``sfid`` is unavailable when ``mu_s`` is empty."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    mu_s: np.ndarray  # (S,), S = 0 for networks without spatial features
    sigma_s: np.ndarray  # (S, S)
    pool: np.ndarray  # (N, D) float32, the real features for Precision/Recall
    saturation: float
    preprocessing: str
    feature_network: str
    resolution: tuple[int, int]
    min_samples: int
    input_transform: str | None = None  # the Inception's 'tf' or 'pytorch-fid'; None for other networks
    path: str = ""

    def check_compatible(self, net: FeatureNetwork, preprocessing: str, resolution: tuple[int, int]) -> None:
        """ValueError naming both sides if samples of ``resolution`` made with ``preprocessing`` and featurised by
        ``net`` cannot be compared with this reference."""
        transform = getattr(net, "input_transform", None)
        if transform is not None:  # the FID Inception: its input path first, the clearest of the differences
            check_same_transform(self.path, self.input_transform, transform)
        same_net = net.name.startswith(INCEPTION_FAMILY) if self.feature_network == "adm" else (
            net.name == self.feature_network
        )  # fmt: skip
        if not same_net:
            raise ValueError(
                f"reference {self.path} was made with the feature network {self.feature_network!r}, the samples' "
                f"features with {net.name!r}"
            )
        self.check_samples(preprocessing, resolution)

    def check_samples(self, preprocessing: str, resolution: tuple[int, int]) -> None:
        """ValueError naming both sides unless samples of ``resolution`` made with ``preprocessing`` match the
        reference's images (the part of :meth:`check_compatible` that needs no feature network)."""
        if self.preprocessing != preprocessing:
            raise ValueError(
                f"reference {self.path} was made with preprocessing {self.preprocessing!r}, the samples are "
                f"{preprocessing!r}; never compare statistics of differently prepared images"
            )
        if tuple(self.resolution) != tuple(resolution):
            raise ValueError(
                f"reference {self.path} holds {self.resolution[0]}×{self.resolution[1]} images, the samples are "
                f"{resolution[0]}×{resolution[1]}"
            )


def check_same_transform(path: str, reference: str | None, samples: str | None) -> None:
    """ValueError naming both input transforms unless the reference's features were made like the samples'."""
    if reference != samples:
        made = f"input transform {reference!r}" if reference else "no recorded input transform (rebuild it)"
        raise ValueError(
            f"reference {path} was made with {made}, the samples' features with input transform {samples!r}; "
            "one comparison, one pipeline"
        )


def recorded_network(path: str) -> tuple[str, str | None]:
    """(feature network, input transform) the reference file ``path`` was made with, without reading its arrays:
    ``('adm', 'tf')`` for an ADM batch (ADM's statistics come from the TF graph)."""
    with open_npz(path) as f:
        if "feature_network" not in f.files:
            return "adm", ADM_INPUT_TRANSFORM
        transform = str(f["input_transform"][()]) if "input_transform" in f.files else None
        return str(f["feature_network"][()]), transform


def needs_inception(feature_network: str) -> bool:
    """Whether a reference made with ``feature_network`` (:func:`recorded_network`) needs the FID Inception."""
    return feature_network == "adm" or feature_network.startswith(INCEPTION_FAMILY)


def build_reference(
    net: FeatureNetwork,
    shape: tuple[int, ...],
    batches: Iterator[np.ndarray],
    *,
    preprocessing: str,
    min_samples: int | None = None,
) -> Reference:
    """The reference of uint8 ``(N, H, W, 3)`` images given as ``batches`` (``shape`` their whole shape)."""
    check_resolution(net, shape, "reference images")
    saturation_sum, count = [0.0], [0]

    def counted() -> Iterator[np.ndarray]:
        for b in batches:
            saturation_sum[0] += metrics.hsv_saturation(b) * len(b)
            count[0] += len(b)
            yield b

    feats = features_of_batches(net, counted(), shape[0], "reference features")
    mu, sigma = metrics.feature_statistics(feats["pool"])
    mu_s, sigma_s = metrics.feature_statistics(feats["spatial"]) if "spatial" in feats else (np.zeros(0),) * 2
    return Reference(
        mu=mu,
        sigma=sigma,
        mu_s=mu_s,
        sigma_s=np.reshape(sigma_s, (len(mu_s), len(mu_s))),
        pool=feats["pool"].astype(np.float32),
        saturation=saturation_sum[0] / count[0],
        preprocessing=preprocessing,
        feature_network=net.name,
        resolution=(int(shape[1]), int(shape[2])),
        min_samples=int(min_samples if min_samples is not None else min(shape[0], ADM_MIN_SAMPLES)),
        input_transform=getattr(net, "input_transform", None),
    )


def save(ref: Reference, path: str) -> None:
    """Writes ``ref`` in the ADM format plus its fields (``pool`` as ``features_pool``), atomically."""
    metrics.save_reference(
        path,
        mu=ref.mu,
        sigma=ref.sigma,
        mu_s=ref.mu_s,
        sigma_s=ref.sigma_s,
        preprocessing=ref.preprocessing,
        dims=None,
        extra=dict(
            features_pool=ref.pool,
            saturation=np.float64(ref.saturation),
            feature_network=np.array(ref.feature_network),
            resolution=np.asarray(ref.resolution, np.int64),
            min_samples=np.int64(ref.min_samples),
            **({} if ref.input_transform is None else {"input_transform": np.array(ref.input_transform)}),
        ),
    )


def load_reference(path: str, net: FeatureNetwork | None, cache_dir: str) -> Reference:
    """Reads a reference of ours or an ADM batch (its pool features and saturation computed from its images with
    ``net``, which must take the ``'tf'`` input path, and cached in ``cache_dir``); ``path`` may also be an
    ``http(s)://`` URL (downloaded into the cache once). ValueError naming the file when it is neither."""
    path = local_copy(path)
    feature_network, transform = recorded_network(path)
    if feature_network != "adm":
        stats = metrics.load_adm_reference(path, load_images=False, dims=None)
        with open_npz(path) as f:
            missing = {"features_pool", "saturation", "resolution", "min_samples"} - set(f.files)
            if missing:
                raise ValueError(f"{path}: a reference of ours must hold {sorted(missing)}; rebuild it")
            return Reference(
                mu=stats["mu"],
                sigma=stats["sigma"],
                mu_s=stats["mu_s"],
                sigma_s=stats["sigma_s"],
                pool=f["features_pool"],
                saturation=float(f["saturation"]),
                preprocessing=stats["preprocessing"],
                feature_network=str(f["feature_network"][()]),
                resolution=tuple(int(v) for v in f["resolution"]),
                min_samples=int(f["min_samples"]),
                input_transform=transform,
                path=path,
            )
    stats = metrics.load_adm_reference(path, load_images=False)
    shape, batches = npz_array_batches(path, "arr_0")
    if net is None or not net.name.startswith(INCEPTION_FAMILY):
        raise ValueError(f"{path} is an ADM reference batch: its features need the FID Inception (--inception FILE)")
    check_same_transform(path, ADM_INPUT_TRANSFORM, getattr(net, "input_transform", None))
    cache = workdir_path(cache_dir) / "reference_features.npz"
    key = f"{workdir_path(path)}:{file_size(path)}:{net.name}"
    if cache.exists():
        with open_npz(cache) as f:
            if str(f["key"][()]) == key:
                return _adm(stats, f["pool"], float(f["saturation"]), shape, path)
    ref = build_reference(net, shape, batches, preprocessing=stats["preprocessing"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_npz(cache, key=np.array(key), pool=ref.pool, saturation=np.float64(ref.saturation))
    return _adm(stats, ref.pool, ref.saturation, shape, path)


def _adm(stats: dict, pool: np.ndarray, saturation: float, shape: tuple[int, ...], path: str) -> Reference:
    """An ADM batch's reference: its own statistics (made by ADM with the TF Inception), our pool features."""
    return Reference(
        mu=stats["mu"],
        sigma=stats["sigma"],
        mu_s=stats["mu_s"],
        sigma_s=stats["sigma_s"],
        pool=pool,
        saturation=saturation,
        preprocessing=stats["preprocessing"],
        feature_network="adm",
        resolution=(int(shape[1]), int(shape[2])),
        min_samples=ADM_MIN_SAMPLES,
        input_transform=ADM_INPUT_TRANSFORM,
        path=path,
    )


def digits_images() -> np.ndarray:
    """scikit-learn's 1797 digits as the evaluation sees samples: uint8 (1797, 8, 8, 3), gray repeated."""
    from gmflow_jax.data import digits_arrays
    from gmflow_jax.evaluate.sampling import to_uint8_rgb

    return to_uint8_rgb(digits_arrays()[0])


def image_source(images: str, resolution: int) -> tuple[tuple[int, ...], Iterator[np.ndarray], str]:
    """(shape, batches, preprocessing) of ``images``: 'digits', an ``.npz`` with uint8 ``arr_0`` (N, H, W, 3)
    (taken as it is: preprocessing 'adm'), or a folder of image files (ADM centre crop to ``resolution``)."""
    if images == "digits":
        x = digits_images()
        return x.shape, iter([x]), "digits"
    if images.endswith(".npz"):
        shape, batches = npz_array_batches(images, "arr_0")
        return shape, batches, "adm"
    if not os.path.isdir(images):
        raise ValueError(f"--images must be 'digits', an .npz or a folder of images; got {images!r}")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(images) for f in fs if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {images!r}")

    def batches() -> Iterator[np.ndarray]:
        from PIL import Image

        from gmflow_jax.data.images import center_crop

        for i in range(0, len(files), 500):
            out = []
            for name in files[i : i + 500]:
                with Image.open(name) as im:
                    out.append(center_crop(im.convert("RGB"), resolution))
            yield np.stack(out)

    return (len(files), resolution, resolution, 3), batches(), "adm"


def main(argv: list[str]) -> None:
    from absl import app, flags

    from gmflow_jax.evaluate.features import feature_network

    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not f.images or not f.out:
        raise app.UsageError("--images and --out are required.")
    if not f.out.endswith(".npz"):
        raise ValueError(f"--out must name an .npz file; got {f.out!r}")
    shape, batches, preprocessing = image_source(f.images, f.resolution)
    preprocessing = f.preprocessing or preprocessing
    # the digits network for the digits unless --inception is given; the FID Inception for any other images
    use_inception = bool(f.inception) or f.images != "digits"
    net = feature_network(f.inception, preprocessing, f.feature_batch, f.input_transform, use_inception)
    ref = build_reference(net, shape, batches, preprocessing=preprocessing)
    save(ref, f.out)
    transform = f", input transform {ref.input_transform!r}" if ref.input_transform else ""
    print(
        f"wrote {f.out}: {shape[0]} images {ref.resolution[0]}×{ref.resolution[1]}, preprocessing "
        f"{ref.preprocessing!r}, features {ref.feature_network}{transform}",
        flush=True,
    )


if __name__ == "__main__":
    from absl import flags

    from gmflow_jax import cli

    flags.DEFINE_string("images", None, "'digits', an .npz with uint8 arr_0 (N, H, W, 3), or a folder of images.")
    flags.DEFINE_string(
        "inception", None, "pytorch-fid's Inception weights: a path, gs:// or http(s):// URL (default: the official "
        "URL, downloaded into $GMFLOW_JAX_CACHE or ~/.cache/gmflow_jax once)."
    )  # fmt: skip
    flags.DEFINE_enum("input_transform", "tf", ["tf", "pytorch-fid"], "The Inception's input path: 'tf' (the ADM "
                      "evaluator's, every published ImageNet FID) or 'pytorch-fid' (pytorch-fid's).")  # fmt: skip
    flags.DEFINE_string("out", None, "The reference file to write (.npz).")
    flags.DEFINE_integer("resolution", 256, "Side of the ADM centre crop of a folder's images.")
    flags.DEFINE_string("preprocessing", None, "Record this preprocessing instead of the source's ('adm', 'digits').")
    flags.DEFINE_integer("feature_batch", 200, "Images per Inception call.")
    cli.run(main, prog="gmflow_jax.evaluate.reference", expected=(ValueError, OSError))
