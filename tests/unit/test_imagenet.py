"""``imagenet_latents``: the per-image recipe, the source listing, resumable byte-identical builds, metadata checks."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from gmflow_jax.data import imagenet, images, load_source, synthetic

TINY_VAE = dict(
    block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32
)
BUILD = dict(image_size=32, shard_size=8, batch_size=4)  # 19 files -> 3 shards


def reference_crop(image: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's centre crop, written independently: halvings counted first, PIL's crop box."""
    halvings = 0
    while min(image.size) >> halvings >= 2 * size:
        halvings += 1
    for _ in range(halvings):
        image = image.resize((image.size[0] // 2, image.size[1] // 2), Image.BOX)
    short = min(image.size)
    w, h = (int(round(v * size / short)) for v in image.size)
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)))


def jpeg(array: np.ndarray, mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize(
    "shape,size", [((300, 500), 32), ((1030, 513), 64), ((33, 40), 32), ((64, 64), 32), ((97, 260), 24)]
)
def test_center_crop_matches_reference(shape, size):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8))
    out = images.center_crop(image, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference_crop(image, size))


def test_flip_is_a_fixed_function_of_seed_and_index():
    flips = [images.flip_for(0, i) for i in range(2000)]
    assert flips == [images.flip_for(0, i) for i in range(2000)]
    assert 900 < sum(flips) < 1100
    assert flips != [images.flip_for(1, i) for i in range(2000)]
    data = jpeg(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    np.testing.assert_array_equal(images.load_image(data, 16, True), images.load_image(data, 16, False)[:, ::-1])


def test_cmyk_grayscale_and_corrupt_files():
    rgb = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    for mode in ("CMYK", "L"):
        data = jpeg(rgb, mode)
        out = images.load_image(data, 16, False)
        expected = reference_crop(Image.open(io.BytesIO(data)).convert("RGB"), 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, expected)
    gray = images.load_image(jpeg(rgb, "L"), 16, False)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    for bad in (jpeg(rgb)[:200], b"", b"not an image"):
        assert images.load_image(bad, 16, False) is None


def test_synset_order_and_source_errors(tmp_path):
    for synset in ("n09999999", "n00000002", "n01000000"):
        (tmp_path / synset).mkdir()
        for name in ("b.JPEG", "a.JPEG", ".hidden"):
            (tmp_path / synset / name).write_bytes(b"x")
    (tmp_path / "README").write_text("not a synset")
    (tmp_path / "n123").mkdir()  # not a synset name
    synsets, refs = images.list_images(tmp_path)
    assert synsets == ["n00000002", "n01000000", "n09999999"]
    assert [(r.label, r.name) for r in refs[:3]] == [
        (0, "n00000002/a.JPEG"),
        (0, "n00000002/b.JPEG"),
        (1, "n01000000/a.JPEG"),
    ]
    assert len(refs) == 6
    with pytest.raises(ValueError, match="does not exist"):
        images.list_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="no synset folders"):
        images.list_images(tmp_path / "n123")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a tar"):
        images.list_images(tmp_path / "file.txt")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic ImageNet (folder and tar of tars), two VAEs and an uninterrupted reference build."""
    root = tmp_path_factory.mktemp("imagenet")
    src = synthetic.write_synthetic_imagenet(root / "src")
    tars = root / "tars"
    tars.mkdir()
    for synset in sorted(os.listdir(src)):
        with tarfile.open(tars / f"{synset}.tar", "w") as t:
            for name in sorted(os.listdir(os.path.join(src, synset)), reverse=True):  # stored unsorted
                t.add(os.path.join(src, synset, name), arcname=name)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as t:
        for name in sorted(os.listdir(tars)):
            t.add(tars / name, arcname=name)
    vae = synthetic.write_random_vae(root / "vae", **TINY_VAE)
    other_weights = synthetic.write_random_vae(root / "vae_seed1", seed=1, **TINY_VAE)
    other_config = synthetic.write_random_vae(root / "vae_wide", **{**TINY_VAE, "block_out_channels": (8, 16, 32)})
    ref = imagenet.build(imagenet.make_plan(src, root / "ref", vae, **BUILD))
    return dict(root=root, src=src, vae=vae, other_weights=other_weights, other_config=other_config, ref=ref)


def files_of(folder: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_built_dataset_reads_through_tfds_and_load_source(world):
    data_dir = world["root"] / "ref"
    ds = tfds.data_source("imagenet_latents", data_dir=data_dir, split="train")
    assert len(ds) == 18  # 3 synsets × 6 images, the corrupt file skipped
    assert ds[0]["latent"].shape == (8, 8, 4) and ds[0]["latent"].dtype == np.float32
    assert [ds[i]["label"] for i in range(len(ds))] == [0] * 6 + [1] * 6 + [2] * 6
    source = load_source("imagenet_latents", data_dir)
    assert set(source[3]) == {"image", "label"}
    np.testing.assert_array_equal(source[3]["image"], ds[3]["latent"])
    m = source.metadata
    assert m["synsets"] == ["n01440764", "n01441764", "n01442764"]
    assert (m["image_size"], m["crop"], m["seed"], m["num_images"], m["num_skipped"]) == (32, "adm_center", 0, 19, 1)
    assert m["vae_config"]["block_out_channels"] == [8, 16, 16] and len(m["vae_fingerprint"]) == 64
    assert not os.path.exists(data_dir / "imagenet_latents.build")  # shards removed after assembly


def test_latents_are_the_recipe(world):
    """Record 0 is encode(vae, flipped-or-not crop, fold_in(key(seed), 0)) at batch position 0."""
    import jax

    from gmflow_jax.models import vae as vae_lib
    from gmflow_jax.models import vae_apply

    source = load_source("imagenet_latents", world["root"] / "ref")
    _, refs = images.list_images(world["src"])
    x = np.zeros((4, 32, 32, 3), np.uint8)
    x[0] = images.load_image(refs[0].read(), 32, images.flip_for(0, 0))
    vae = vae_lib.load_vae(world["vae"])
    z = np.asarray(vae_apply.encode(vae, x, jax.random.fold_in(jax.random.key(0), 0)))[0]
    np.testing.assert_array_equal(source[0]["image"], z)
    assert 0.01 < z.std() < 10


def test_tar_of_tars_gives_the_same_dataset(world, tmp_path):
    folder = images.list_images(world["src"])
    tar = images.list_images(world["root"] / "ILSVRC2012_img_train.tar")
    assert folder[0] == tar[0] and [r.name for r in folder[1]] == [r.name for r in tar[1]]
    assert [r.read() for r in folder[1]] == [r.read() for r in tar[1]]
    built = imagenet.build(
        imagenet.make_plan(world["root"] / "ILSVRC2012_img_train.tar", tmp_path, world["vae"], **BUILD)
    )
    assert files_of(built) == files_of(world["ref"])


def test_interrupted_build_resumes_to_identical_files(world, tmp_path):
    plan = imagenet.make_plan(world["src"], tmp_path, world["vae"], **BUILD)

    class Killed(Exception):
        pass

    def kill_after_first(shard):
        raise Killed(f"killed after shard {shard}")

    with pytest.raises(Killed):
        imagenet.build(plan, on_shard=kill_after_first)
    assert sorted(os.listdir(plan.shard_dir)) == ["manifest.json", "shard-00000.npy"]
    Path(plan.shard_path(1) + ".tmp999").write_bytes(b"half a shard from a killed process")
    with pytest.raises(ValueError, match="other settings.*seed"):
        imagenet.build(imagenet.make_plan(world["src"], tmp_path, world["vae"], seed=1, **BUILD))
    encoded = []
    built = imagenet.build(plan, on_shard=encoded.append)
    assert encoded == [1, 2]
    assert files_of(built) == files_of(world["ref"])
    assert imagenet.build(plan, on_shard=encoded.append) == built and encoded == [1, 2]  # built: nothing to do
    with pytest.raises(ValueError, match="already holds imagenet_latents built with other settings.*seed"):
        imagenet.build(imagenet.make_plan(world["src"], tmp_path, world["vae"], seed=1, **BUILD))


def test_vae_and_crop_mismatch_errors(world):
    from gmflow_jax.train.config import load_config
    from gmflow_jax.train.data import check_data

    source = load_source("imagenet_latents", world["root"] / "ref")
    config = load_config("imagenet_gmdit_k8", "tiny").unlock()
    config.model.vae = world["vae"]
    check_data(config, source)
    config.model.vae = os.path.basename(world["vae"])  # relative to the workdir
    check_data(config, source, workdir=os.path.dirname(world["vae"]))
    config.model.vae = world["other_weights"]
    with pytest.raises(ValueError, match=r"vae_seed1.*weights sha256.*expected the same VAE"):
        check_data(config, source)
    config.model.vae = world["other_config"]
    with pytest.raises(ValueError, match=r"vae_wide.*another VAE config.*block_out_channels"):
        check_data(config, source)
    config.model.vae = world["vae"]
    config.data.image_size = 64
    with pytest.raises(ValueError, match=r"built from 32² crops but config.data.image_size=64"):
        check_data(config, source)


def test_plan_errors(world, tmp_path):
    with pytest.raises(ValueError, match="--vae .* is not a folder"):
        imagenet.make_plan(world["src"], tmp_path, tmp_path / "missing")
    with pytest.raises(ValueError, match="has no config.json"):
        imagenet.make_plan(world["src"], tmp_path, world["src"])
    with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling factor 4"):
        imagenet.make_plan(world["src"], tmp_path, world["vae"], image_size=30)
    with pytest.raises(ValueError, match="only 'train'"):
        imagenet.make_plan(world["src"], tmp_path, world["vae"], split="validation")
    with pytest.raises(ValueError, match="not built in .*build_imagenet"):
        load_source("imagenet_latents", tmp_path)
