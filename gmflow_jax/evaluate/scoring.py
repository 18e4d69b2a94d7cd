"""The metrics of a setting's samples against a reference: FID, sFID, IS, Precision/Recall, saturation.

Features are computed per sampling chunk (``<setting>/features/chunk-*.npz``, the chunks of JAX process ``p`` on
process ``p``, as the sampling) and cached there with the network's name, so a rerun after a kill, or with more
guidance values, only featurises what is new. Process 0 then scores every setting.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from etils import epath

from gmflow_jax.cache import local_copy
from gmflow_jax.evaluate import metrics
from gmflow_jax.evaluate.features import FeatureNetwork, cached_features, feature_network
from gmflow_jax.evaluate.reference import Reference, load_reference, needs_inception, recorded_network
from gmflow_jax.storage import open_npz, workdir_path

METRIC_KEYS = ("fid", "sfid", "is", "is_std", "precision", "recall", "saturation")


def _chunk_files(folder: epath.Path) -> list[epath.Path]:
    return sorted((folder / "chunks").glob("chunk-*.npz"))


def featurise_setting(folder: str | epath.PathLike, net: FeatureNetwork) -> None:
    """Caches the features and saturation of this process's share of ``folder``'s sample chunks, printing
    images/s and ETA."""
    folder = workdir_path(folder)
    (folder / "features").mkdir(parents=True, exist_ok=True)
    chunks = _chunk_files(folder)
    mine = list(range(jax.process_index(), len(chunks), jax.process_count()))
    t0, done = time.time(), 0
    for n, i in enumerate(mine):
        path = folder / "features" / chunks[i].name

        def images(chunk: epath.Path = chunks[i]) -> np.ndarray:
            with open_npz(chunk) as f:
                return f["images"]

        done += int(cached_features(net, images, path, where=str(chunks[i]))["count"])
        elapsed = max(time.time() - t0, 1e-9)
        print(
            f"features {folder.name}: chunk {n + 1}/{len(mine)}, {done / elapsed:.1f} images/s, "
            f"ETA {(len(mine) - n - 1) * elapsed / (n + 1):.0f} s",
            flush=True,
        )


def setting_features(folder: str | epath.PathLike, net: FeatureNetwork) -> dict[str, np.ndarray]:
    """All features of ``folder`` in sample order (after :func:`featurise_setting` on every process)."""
    folder, parts = workdir_path(folder), []
    for chunk in _chunk_files(folder):
        with open_npz(folder / "features" / chunk.name) as f:
            if str(f["feature_network"][()]) != net.name:
                raise ValueError(f"{folder}: features of {chunk} were made by {f['feature_network']}, not {net.name}")
            parts.append({k: f[k] for k in f.files if k != "feature_network"})
    return {k: np.concatenate([np.atleast_1d(p[k]) for p in parts]) for k in parts[0]}


def score(feats: dict[str, np.ndarray], ref: Reference) -> dict[str, Any]:
    """The metric keys (:data:`METRIC_KEYS`) of one setting's features against ``ref``; sFID is None without
    spatial features; saturation is the samples' mean HSV saturation minus the reference's."""
    mu, sigma = metrics.feature_statistics(feats["pool"])
    out: dict[str, Any] = {"fid": metrics.frechet_distance(mu, sigma, ref.mu, ref.sigma), "sfid": None}
    if "spatial" in feats and ref.mu_s.size:
        mu_s, sigma_s = metrics.feature_statistics(feats["spatial"])
        out["sfid"] = metrics.frechet_distance(mu_s, sigma_s, ref.mu_s, ref.sigma_s)
    out["is"], out["is_std"] = metrics.inception_score(feats["logits"], splits=min(10, len(feats["logits"])))
    out["precision"], out["recall"] = metrics.precision_recall(ref.pool, feats["pool"], k=3)
    counts = feats["count"].astype(np.float64)
    out["saturation"] = float(np.sum(feats["saturation"] * counts) / np.sum(counts)) - ref.saturation
    return {k: (None if v is None else float(v)) for k, v in out.items()}


def samples_preprocessing(config: Any) -> str:
    """How the training images of a run were prepared, which its samples imitate: 'adm' (ImageNet latents of ADM
    centre crops), 'digits', or the dataset's name."""
    dataset = str(config.data.dataset)
    return {"imagenet_latents": "adm"}.get(dataset, dataset)


def reference_for(ref: str | None, net: FeatureNetwork, config: Any, out: str) -> Reference:
    """``ref`` loaded (an ADM batch or ours); for digits runs without one, the real digits' (built once in ``out``)."""
    from gmflow_jax.evaluate import reference

    if ref:
        return reference.load_reference(ref, net, out)
    if samples_preprocessing(config) != "digits":
        raise ValueError("--ref is needed with --inception: the ADM reference batch or one made by "
                         "python -m gmflow_jax.evaluate.reference")  # fmt: skip
    path = workdir_path(out) / "reference_digits.npz"
    if jax.process_index() == 0 and not _is_reference_of(path, net):
        path.parent.mkdir(parents=True, exist_ok=True)
        shape, batches, prep = reference.image_source("digits", 8)
        reference.save(reference.build_reference(net, shape, batches, preprocessing=prep), path)
    from gmflow_jax.multihost import barrier

    barrier("gmflow_evaluate_reference")
    return reference.load_reference(str(path), net, out)


def _is_reference_of(path: epath.Path, net: FeatureNetwork) -> bool:
    if not path.exists():
        return False
    with open_npz(path) as f:
        return "feature_network" in f.files and str(f["feature_network"][()]) == net.name


def _enough_samples(ref: Reference, num_samples: int, allow_fewer: bool, ref_path: str | None) -> bool:
    """Whether ``num_samples`` meet ``ref``'s protocol (or ``allow_fewer``); too few is a ValueError with an explicit
    reference (``ref_path``), a note for the digits default."""
    if num_samples >= ref.min_samples or allow_fewer:
        return True
    why = (
        f"--num_samples={num_samples} is fewer than the {ref.min_samples} samples the reference's protocol needs "
        "(metrics from fewer samples are biased: FID rises); add --allow_fewer_samples"
    )
    if ref_path:
        raise ValueError(why)
    print(f"note: no metrics: {why}", flush=True)
    return False


def input_transform_for(ref_path: str | None, asked: str | None) -> tuple[str, bool]:
    """(the Inception's input transform, whether the reference needs the Inception) for comparing samples with the
    reference file ``ref_path`` (local): the reference's own transform ('tf' for an ADM batch), else ``asked``, else
    'tf'. ValueError naming both when ``asked`` differs from the reference's: one comparison, one pipeline."""
    network, recorded = recorded_network(ref_path) if ref_path else ("", None)
    if asked and recorded and asked != recorded:
        raise ValueError(
            f"--input_transform={asked!r} but the reference {ref_path} was made with input transform {recorded!r}; "
            "statistics of two input pipelines are never compared (leave --input_transform out to use the "
            "reference's)"
        )
    return asked or recorded or "tf", bool(network) and needs_inception(network)


def prepare(
    sampler: Any,
    out: str,
    ref_path: str | None,
    inception: str | None,
    num_samples: int,
    allow_fewer: bool,
    feature_batch: int,
    input_transform: str | None = None,
) -> tuple[FeatureNetwork | None, Reference | None]:
    """(feature network, reference) for scoring ``sampler``'s samples, or (None, None) for samples only; every
    mismatch a ValueError naming both sides. ``ref_path`` and ``inception`` may be ``http(s)://`` URLs (downloaded
    into the cache once); the Inception's input transform is the reference's (:func:`input_transform_for`). Too few
    samples for the reference's protocol: an error with ``--ref``, a note (samples only) for the digits default."""
    ref_path = local_copy(ref_path) if ref_path else None
    transform, use_inception = input_transform_for(ref_path, input_transform)
    preprocessing = samples_preprocessing(sampler.config)
    factor = sampler.vae.config.downsample_factor if sampler.config.model.get("vae", "") else 1
    resolution = tuple(d * factor for d in sampler.data_shape[:2])
    ours = None  # a reference of ours is checked before the feature network is built (the Inception: seconds)
    if ref_path and recorded_network(ref_path)[0] != "adm":
        ours = load_reference(ref_path, None, out)
        ours.check_samples(preprocessing, resolution)
        _enough_samples(ours, num_samples, allow_fewer, ref_path)
    net = feature_network(inception, preprocessing, feature_batch, transform, use_inception)
    if net is None:
        return None, None
    ref = ours or reference_for(ref_path, net, sampler.config, out)
    ref.check_compatible(net, preprocessing, resolution)
    if not _enough_samples(ref, num_samples, allow_fewer, ref_path):
        return None, None
    return net, ref
