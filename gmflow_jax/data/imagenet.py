"""``imagenet_latents``: ImageNet-1k train images encoded by a VAE (TFDS array_record, no TensorFlow).

Features: ``latent`` float32 ``(S/f, S/f, C)`` (scaled posterior samples, e.g. 32×32×4 for S = 256 with
sd-vae-ft-ema) and ``label`` int64, the index of the image's synset in sorted order (0..999). The dataset
info's metadata (``metadata.json`` beside the records) holds the synsets, ``image_size``, ``crop``
(``'adm_center'``), ``seed``, ``shard_size`` / ``batch_size`` (they fix the noise, see below), the VAE's
config and sha256 fingerprint, and the image counts.

Per image (the published recipe): decode, convert to RGB (CMYK / grayscale JPEGs exist), ADM centre crop
to S² (``center_crop``), horizontal flip iff ``flip_for(seed, index)``, ``2·img/255 − 1``, posterior
sample × ``scaling_factor`` via ``vae_apply.encode``. ``index`` is the image's position in the file list
(synsets sorted, file names sorted within a synset), the same for a folder and a tar of tars. Files
that do not decode are skipped (counted, logged). The VAE key of a batch is ``fold_in(key(seed),
first index of the batch)`` with batches aligned to ``batch_size`` inside each shard, skipped files kept
as placeholders, so the latents depend only on (images, VAE, seed, image_size, shard_size, batch_size).

Building (``build``; ``python -m gmflow_jax.data.build_imagenet``) has two steps:

1. ``<data_dir>/imagenet_latents.build/shard-NNNNN.npy``: shard ``s`` holds images ``[s·N, (s+1)·N)``
   as one structured array (``index``, ``label``, ``latent``), written to a temporary name and renamed
   when complete. JAX process ``p`` of ``P`` encodes the shards ``s ≡ p (mod P)``, decoding and
   cropping on a thread pool while the VAE (jitted, batch-sharded over the local devices) encodes. A
   killed build continues at the first missing shard; ``manifest.json`` refuses a resume with other
   settings. With several hosts, ``data_dir`` must be a file system that all of them see (plain file I/O).
2. Process 0 writes the TFDS dataset from the shards in order (``<data_dir>/imagenet_latents/1.0.0``,
   TFDS writes it under a temporary name and renames it) and removes the shard folder.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from gmflow_jax.data.builders import _LocalBuilder, _quiet
from gmflow_jax.data.images import ImageRef, flip_for, list_images, load_image
from gmflow_jax.data.staging import sync_folder
from gmflow_jax.storage import is_url, workdir_path, write_atomic

NAME = "imagenet_latents"
DATASET_VERSION = "1.0.0"
CROP = "adm_center"
BUILD_COMMAND = "python -m gmflow_jax.data.build_imagenet --source ILSVRC2012_img_train --data_dir DIR --vae VAE_DIR"

log = logging.getLogger(__name__)


# --- the VAE --------------------------------------------------------------------------------


def vae_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 of the VAE's weights file (the one ``load_vae`` reads)."""
    from gmflow_jax.models.convert import weights_file

    digest = hashlib.sha256()
    with workdir_path(weights_file(folder)).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def vae_config_dict(folder: str | os.PathLike) -> dict[str, Any]:
    """``VAEConfig.to_dict()`` of a diffusers VAE folder's ``config.json``; ``ValueError`` if it is not one."""
    from gmflow_jax.models import vae as vae_lib

    path = workdir_path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"VAE folder {os.fspath(folder)!r} has no config.json; expected a diffusers AutoencoderKL folder."
        )
    try:
        return vae_lib.VAEConfig.from_dict(json.loads(path.read_text())).to_dict()
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"VAE config {path} is not a valid AutoencoderKL config: {e}") from None


def check_vae_match(metadata: Any, vae_folder: str, image_size: int = 0) -> None:
    """``ValueError`` naming both sides if a built dataset's VAE (config, weights) or crop do not match.

    ``metadata``: the dataset's metadata dict; ``vae_folder``: the run's ``config.model.vae``;
    ``image_size``: the run's ``config.data.image_size`` (0: not checked).
    """
    if image_size and int(metadata["image_size"]) != image_size:
        raise ValueError(
            f"dataset {NAME} was built from {metadata['image_size']}² crops but config.data.image_size={image_size}."
        )
    if metadata.get("crop") != CROP:
        raise ValueError(f"dataset {NAME} was built with crop {metadata.get('crop')!r}; expected {CROP!r}.")
    if not vae_folder:
        return
    config = vae_config_dict(vae_folder)
    if config != metadata["vae_config"]:
        changed = sorted(
            k for k in set(config) | set(metadata["vae_config"]) if config.get(k) != metadata["vae_config"].get(k)
        )
        raise ValueError(
            f"config.model.vae={vae_folder!r} has another VAE config than dataset {NAME} was built with "
            f"(differs in {changed}); expected the dataset's VAE."
        )
    fingerprint = vae_fingerprint(vae_folder)
    if fingerprint != metadata["vae_fingerprint"]:
        raise ValueError(
            f"config.model.vae={vae_folder!r} has weights sha256 {fingerprint[:16]}…, but dataset {NAME} was "
            f"encoded with {metadata['vae_fingerprint'][:16]}…; expected the same VAE."
        )


# --- the TFDS builder -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """What a build writes: settings, the image list and where the shards go."""

    data_dir: str
    split: str
    seed: int
    image_size: int
    shard_size: int
    batch_size: int
    synsets: tuple[str, ...]
    refs: tuple[ImageRef, ...]
    vae_folder: str
    vae_config: dict[str, Any]
    vae_fingerprint: str

    @property
    def shard_dir(self) -> str:
        return str(workdir_path(self.data_dir) / f"{NAME}.build")

    @property
    def num_shards(self) -> int:
        return -(-len(self.refs) // self.shard_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        factor = 2 ** (len(self.vae_config["block_out_channels"]) - 1)
        side = self.image_size // factor
        return (side, side, int(self.vae_config["latent_channels"]))

    def shard_path(self, shard: int) -> str:
        return str(workdir_path(self.shard_dir) / f"shard-{shard:05d}.npy")

    def manifest(self) -> dict[str, Any]:
        """The settings that determine the shards' bytes (a resume must match them)."""
        names = hashlib.sha256("\n".join(r.name for r in self.refs).encode()).hexdigest()
        return {
            "split": self.split,
            "seed": self.seed,
            "image_size": self.image_size,
            "crop": CROP,
            "shard_size": self.shard_size,
            "batch_size": self.batch_size,
            "num_images": len(self.refs),
            "file_list_sha256": names,
            "synsets": list(self.synsets),
            "vae_config": self.vae_config,
            "vae_fingerprint": self.vae_fingerprint,
        }

    def record_dtype(self) -> np.dtype:
        return np.dtype([("index", "<i8"), ("label", "<i8"), ("latent", "<f4", self.latent_shape)])


class ImagenetLatents(_LocalBuilder):
    """ImageNet-1k train images as scaled VAE latents: ``latent`` float32 (S/f, S/f, C), ``label`` int64 (synset).

    Built only by ``gmflow_jax.data.build_imagenet`` (never on first use); see ``gmflow_jax.data.imagenet``.
    """

    name = NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "ADM centre crop, seeded flips, VAE posterior samples × scaling_factor."}

    def __init__(self, *, plan: BuildPlan | None = None, **kwargs: Any):
        self._plan = plan
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        plan = self._plan
        if plan is None:  # reading: the features as built
            path = os.path.join(os.fspath(self.data_path), "features.json")
            if os.path.isfile(path):
                features = tfds.features.FeatureConnector.from_config(os.fspath(self.data_path))
            else:  # not built: the published shapes (download_and_prepare then says how to build it)
                features = _features((32, 32, 4), 1000)
            return self.dataset_info_from_configs(
                description=type(self).__doc__, features=features, disable_shuffling=True
            )
        return self.dataset_info_from_configs(
            description=type(self).__doc__,
            features=_features(plan.latent_shape, len(plan.synsets)),
            supervised_keys=("latent", "label"),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(_metadata(plan)),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager
        if self._plan is None:
            raise ValueError(f"dataset {NAME} is not built in {self._data_dir_root}; build it with: {BUILD_COMMAND}")
        return {self._plan.split: self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for shard in range(self._plan.num_shards):
            for r in _read_shard(self._plan.shard_path(shard)):
                yield int(r["index"]), {"latent": np.asarray(r["latent"]), "label": int(r["label"])}


def _features(latent_shape: tuple[int, ...], num_classes: int) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "latent": tfds.features.Tensor(shape=tuple(latent_shape), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=num_classes),
        }
    )


def _metadata(plan: BuildPlan) -> dict[str, Any]:
    """The dataset's metadata: the manifest and the record counts."""
    num_records = sum(_shard_length(plan.shard_path(s)) for s in range(plan.num_shards))
    meta = plan.manifest()
    meta.update(num_records=num_records, num_skipped=len(plan.refs) - num_records)
    return meta


def dataset_dir(data_dir: str | os.PathLike) -> str:
    """Where the built dataset lives: ``<data_dir>/imagenet_latents/<version>``."""
    return str(workdir_path(data_dir) / NAME / DATASET_VERSION)


# --- the build ------------------------------------------------------------------------------


def make_plan(
    source: str | os.PathLike,
    data_dir: str | os.PathLike,
    vae_folder: str | os.PathLike,
    *,
    split: str = "train",
    seed: int = 0,
    image_size: int = 256,
    shard_size: int = 1000,
    batch_size: int = 64,
) -> BuildPlan:
    """Checks the arguments and lists the source; ``ValueError`` naming the argument for anything wrong."""
    if split != "train":
        raise ValueError(f"--split={split!r}: only 'train' (synset folders, labels from them) can be built.")
    for flag, value in (
        ("seed", seed),
        ("image_size", image_size),
        ("shard_size", shard_size),
        ("batch_size", batch_size),
    ):
        if not isinstance(value, int) or value < (0 if flag == "seed" else 1):
            raise ValueError(f"--{flag}={value!r}: expected an int >= {0 if flag == 'seed' else 1}.")
    vae_folder = str(workdir_path(vae_folder))
    if not workdir_path(vae_folder).is_dir():
        raise ValueError(f"--vae {vae_folder} is not a folder; expected a diffusers AutoencoderKL folder.")
    vae_config = vae_config_dict(vae_folder)
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if image_size % factor:
        raise ValueError(f"--image_size={image_size} is not a multiple of the VAE's downsampling factor {factor}.")
    synsets, refs = list_images(source)
    return BuildPlan(
        data_dir=str(workdir_path(data_dir)),
        split=split,
        seed=seed,
        image_size=image_size,
        shard_size=shard_size,
        batch_size=batch_size,
        synsets=tuple(synsets),
        refs=tuple(refs),
        vae_folder=vae_folder,
        vae_config=vae_config,
        vae_fingerprint=vae_fingerprint(vae_folder),
    )


def _open_shard_dir(plan: BuildPlan) -> None:
    """Creates the shard folder with its manifest, or checks that an existing one has the same settings."""
    workdir_path(plan.shard_dir).mkdir(parents=True, exist_ok=True)
    path = workdir_path(plan.shard_dir) / "manifest.json"
    manifest = plan.manifest()
    if path.exists():
        old = json.loads(path.read_text())
        if old != manifest:
            changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ValueError(
                f"the partial build in {plan.shard_dir} was made with other settings ({', '.join(changed)}); "
                "expected the same flags and files to resume, or remove that folder to start over."
            )
        return
    write_atomic(path, json.dumps(manifest, indent=1, sort_keys=True))


def encode_shard(plan: BuildPlan, shard: int, vae: Any, pool: concurrent.futures.Executor) -> np.ndarray:
    """The records of one shard: images decoded and cropped on ``pool``, encoded in aligned batches."""
    import jax

    from gmflow_jax.models import vae_apply

    start, stop = shard * plan.shard_size, min((shard + 1) * plan.shard_size, len(plan.refs))
    size = plan.image_size

    def load(index: int) -> np.ndarray | None:
        ref = plan.refs[index]
        try:
            data = ref.read()
        except OSError:
            data = b""
        return load_image(data, size, flip_for(plan.seed, index))

    def submit(batch: range) -> list[concurrent.futures.Future]:
        return [pool.submit(load, i) for i in batch]

    batches = [range(b, min(b + plan.batch_size, stop)) for b in range(start, stop, plan.batch_size)]
    pending = submit(batches[0])
    out = []
    base_key = jax.random.key(plan.seed)
    for j, batch in enumerate(batches):
        images = [f.result() for f in pending]
        if j + 1 < len(batches):
            pending = submit(batches[j + 1])  # decode the next batch while this one encodes
        kept = [k for k, im in enumerate(images) if im is not None]
        for k, im in enumerate(images):
            if im is None:
                log.warning("skipping %s: not a decodable image", plan.refs[batch[k]].name)
        if not kept:
            continue
        x = np.zeros((plan.batch_size, size, size, 3), np.uint8)  # fixed shape: one compilation
        for k in kept:
            x[k] = images[k]
        latents = np.asarray(vae_apply.encode(vae, x, jax.random.fold_in(base_key, batch.start)))
        rec = np.zeros(len(kept), plan.record_dtype())
        rec["index"] = [batch[k] for k in kept]
        rec["label"] = [plan.refs[batch[k]].label for k in kept]
        rec["latent"] = latents[kept]
        out.append(rec)
    return np.concatenate(out) if out else np.zeros(0, plan.record_dtype())


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _read_shard(path: str) -> np.ndarray:
    """A shard's records: memory-mapped locally, read whole from an object store (a shard is ~16 MB)."""
    if is_url(path):
        return np.load(io.BytesIO(workdir_path(path).read_bytes()), allow_pickle=False)
    return np.load(path, mmap_mode="r")


def _shard_length(path: str) -> int:
    """The number of records of a shard, from its ``.npy`` header only."""
    with workdir_path(path).open("rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape = read_header(f)[0]
    return int(shape[0])


def _write_shard(plan: BuildPlan, shard: int, records: np.ndarray) -> None:
    path = plan.shard_path(shard)
    if is_url(path):  # one upload: all or nothing
        data = io.BytesIO()
        np.save(data, records)
        workdir_path(path).write_bytes(data.getvalue())
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def encode_shards(
    plan: BuildPlan,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> list[int]:
    """Writes this process's missing shards (``s ≡ process_index mod process_count``); returns them.

    ``on_shard(s)`` is called after shard ``s`` is written (progress hooks, tests).
    """
    from gmflow_jax.models import vae as vae_lib

    _open_shard_dir(plan)
    mine = [s for s in range(plan.num_shards) if s % process_count == process_index]
    written = {p.name for p in workdir_path(plan.shard_dir).iterdir()}  # one listing (an object store's is slow)
    todo = [s for s in mine if workdir_path(plan.shard_path(s)).name not in written]
    if len(todo) < len(mine):
        log.info("resuming: %d of this process's %d shards are done", len(mine) - len(todo), len(mine))
    if not todo:
        return []
    vae = vae_lib.load_vae(plan.vae_folder)
    total = sum(min(plan.shard_size, len(plan.refs) - s * plan.shard_size) for s in todo)
    done, t0 = 0, time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
        for n, shard in enumerate(todo):
            records = encode_shard(plan, shard, vae, pool)
            _write_shard(plan, shard, records)
            expected = min(plan.shard_size, len(plan.refs) - shard * plan.shard_size)
            done += expected
            rate = done / max(time.monotonic() - t0, 1e-9)
            log.info(
                "shard %d/%d written (%d/%d images of this process, %d skipped): %.1f images/s, ETA %s",
                n + 1,
                len(todo),
                done,
                total,
                expected - len(records),
                rate,
                _hms((total - done) / rate),
            )
            if on_shard is not None:
                on_shard(shard)
    return todo


def assemble(plan: BuildPlan) -> str:
    """Writes the TFDS dataset from the (complete) shards and removes them; returns the dataset folder."""
    written = {p.name for p in workdir_path(plan.shard_dir).iterdir()}
    missing = [s for s in range(plan.num_shards) if workdir_path(plan.shard_path(s)).name not in written]
    if missing:
        raise ValueError(
            f"shards {missing[:5]} of {plan.num_shards} are missing in {plan.shard_dir}; run the build again."
        )
    remote = is_url(plan.data_dir)  # array_record writes local files only: write there, then upload
    with tempfile.TemporaryDirectory(prefix=f"{NAME}-") if remote else contextlib.nullcontext(plan.data_dir) as local:
        with _quiet():
            builder = ImagenetLatents(plan=plan, data_dir=local, file_format="array_record")
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False), file_format="array_record"
            )
        if remote:
            sync_folder(os.fspath(builder.data_path), dataset_dir(plan.data_dir))
    workdir_path(plan.shard_dir).rmtree()
    return dataset_dir(plan.data_dir)


def build(plan: BuildPlan, *, num_threads: int | None = None, on_shard: Callable[[int], None] | None = None) -> str:
    """Builds (or resumes building) the dataset of ``plan`` on every JAX process; returns its folder."""
    import jax

    from gmflow_jax.multihost import barrier

    path = dataset_dir(plan.data_dir)
    if (workdir_path(path) / "dataset_info.json").is_file():
        built = json.loads((workdir_path(path) / "metadata.json").read_text())
        changed = sorted(k for k, v in plan.manifest().items() if built.get(k) != v)
        if changed:
            raise ValueError(
                f"{path} already holds {NAME} built with other settings ({', '.join(changed)}); remove it to rebuild."
            )
        log.info("%s is already built in %s with these settings: nothing to do", NAME, path)
        if jax.process_index() == 0 and workdir_path(plan.shard_dir).is_dir():  # killed after assembly
            workdir_path(plan.shard_dir).rmtree()
        return path
    encode_shards(
        plan,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_threads=num_threads,
        on_shard=on_shard,
    )
    barrier("imagenet_latents_shards")
    if jax.process_index() == 0:
        path = assemble(plan)
        log.info("%s built in %s", NAME, path)
    barrier("imagenet_latents_assembled")
    return path
