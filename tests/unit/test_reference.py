"""Reference files: ours round-trip, the ADM batch gets its pool features computed once and cached, and samples
that differ in feature network, input transform, preprocessing or resolution are refused naming both sides."""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest
from PIL import Image

from gmflow_jax.evaluate import metrics, reference, scoring


class CountingNet:
    """A stand-in feature network (deterministic, cheap): ``pool`` = per-channel means and squares, ``logits`` = a
    fixed linear map of them; counts its calls so caching can be checked."""

    def __init__(self, name: str, resolution=None, input_transform=None):
        self.name, self.resolution, self.calls = name, resolution, 0
        self.input_transform = input_transform

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.calls += 1
        x = images.astype(np.float32) / 255.0
        pool = np.concatenate([x.mean(axis=(1, 2)), (x**2).mean(axis=(1, 2)), x[:, ::2, ::2].mean(axis=(1, 2))], 1)
        return {"pool": pool, "logits": pool @ np.arange(18, dtype=np.float32).reshape(9, 2)}


def images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_our_reference_round_trips(tmp_path):
    x = images(40)
    net = CountingNet("net-a")
    ref = reference.build_reference(net, x.shape, iter([x[:25], x[25:]]), preprocessing="digits")
    mu, sigma = metrics.feature_statistics(net(x)["pool"])
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-6)
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-5, atol=1e-9)
    assert ref.saturation == pytest.approx(metrics.hsv_saturation(x))
    assert ref.mu_s.shape == (0,) and ref.min_samples == 40 and ref.resolution == (8, 8)
    reference.save(ref, str(tmp_path / "ref.npz"))
    back = reference.load_reference(str(tmp_path / "ref.npz"), net, str(tmp_path))
    for field in ("mu", "sigma", "pool"):
        np.testing.assert_array_equal(getattr(back, field), getattr(ref, field))
    assert (back.preprocessing, back.feature_network, back.resolution, back.min_samples) == (
        "digits",
        "net-a",
        (8, 8),
        40,
    )
    assert back.saturation == ref.saturation
    back.check_compatible(net, "digits", (8, 8))
    with pytest.raises(ValueError, match=r"'net-a'.*'net-b'"):
        back.check_compatible(CountingNet("net-b"), "digits", (8, 8))
    with pytest.raises(ValueError, match=r"'digits'.*'adm'"):
        back.check_compatible(net, "adm", (8, 8))
    with pytest.raises(ValueError, match=r"8×8 images, the samples are 16×16"):
        back.check_compatible(net, "digits", (16, 16))


def test_adm_batch_features_are_computed_once(tmp_path):
    x = images(30, size=16)
    rng = np.random.default_rng(1)
    stats = {"mu": rng.random(2048), "sigma": np.eye(2048), "mu_s": rng.random(2023), "sigma_s": np.eye(2023)}
    path = str(tmp_path / "VIRTUAL_batch.npz")
    np.savez(path, arr_0=x, **stats)  # ADM's layout: statistics and images, nothing else
    net = CountingNet("inception-v3-fid:test:tf", input_transform="tf")
    ref = reference.load_reference(path, net, str(tmp_path / "out"))
    calls = net.calls
    assert calls >= 1 and ref.feature_network == "adm" and ref.preprocessing == "adm"
    assert ref.min_samples == 50_000 and ref.resolution == (16, 16)
    np.testing.assert_array_equal(ref.mu, stats["mu"])  # ADM's own statistics, never recomputed
    np.testing.assert_allclose(ref.pool, net(x)["pool"])
    assert ref.saturation == pytest.approx(metrics.hsv_saturation(x))
    again = reference.load_reference(path, net, str(tmp_path / "out"))
    assert net.calls == calls + 1  # only the assert's own call above: the features came from the cache
    np.testing.assert_array_equal(again.pool, ref.pool)
    again.check_compatible(CountingNet("inception-v3-fid:other-file:tf", input_transform="tf"), "adm", (16, 16))
    with pytest.raises(ValueError, match="FID Inception"):
        reference.load_reference(path, CountingNet("digits-cnn-x"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="'adm'"):
        again.check_compatible(CountingNet("digits-cnn-x"), "adm", (16, 16))


def test_not_a_reference_is_named(tmp_path):
    np.savez(tmp_path / "x.npz", arr_0=images(3))
    with pytest.raises(ValueError, match=r"x.npz: not an ADM reference batch, missing key 'mu'"):
        reference.load_reference(
            str(tmp_path / "x.npz"), CountingNet("inception-v3-fid:t:tf", input_transform="tf"), str(tmp_path)
        )


def test_image_folder_gets_the_adm_crop(tmp_path):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (30, 50), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    shape, batches, preprocessing = reference.image_source(str(tmp_path), 16)
    x = np.concatenate(list(batches))
    assert shape == (3, 16, 16, 3) and x.shape == shape and x.dtype == np.uint8 and preprocessing == "adm"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        reference.image_source(str(tmp_path / "empty"), 16)


def _adm_batch(path: str, size: int = 16) -> np.ndarray:
    """Writes an ADM-layout batch (statistics and images, nothing else) at ``path``; returns its images."""
    x = images(30, size=size)
    rng = np.random.default_rng(1)
    np.savez(path, arr_0=x, mu=rng.random(2048), sigma=np.eye(2048), mu_s=rng.random(2023), sigma_s=np.eye(2023))
    return x


def test_input_transform_is_recorded_and_never_mixed(tmp_path):
    x = images(20)
    tf_net = CountingNet("inception-v3-fid:w.pth:tf", input_transform="tf")
    ref = reference.build_reference(tf_net, x.shape, iter([x]), preprocessing="adm")
    reference.save(ref, str(tmp_path / "ours.npz"))
    back = reference.load_reference(str(tmp_path / "ours.npz"), tf_net, str(tmp_path))
    assert back.input_transform == "tf" and reference.recorded_network(back.path) == (tf_net.name, "tf")
    back.check_compatible(tf_net, "adm", (8, 8))
    torch_net = CountingNet("inception-v3-fid:w.pth:pytorch-fid", input_transform="pytorch-fid")
    with pytest.raises(ValueError, match=r"input transform 'tf', the samples' features with input transform "
                                         r"'pytorch-fid'; one comparison, one pipeline"):  # fmt: skip
        back.check_compatible(torch_net, "adm", (8, 8))

    # the evaluation takes the reference's transform; asked for another, it refuses in one line naming both
    assert scoring.input_transform_for(back.path, None) == ("tf", True)
    assert scoring.input_transform_for(back.path, "tf") == ("tf", True)
    with pytest.raises(ValueError) as e:
        scoring.input_transform_for(back.path, "pytorch-fid")
    assert "--input_transform='pytorch-fid'" in str(e.value) and "'tf'" in str(e.value) and "\n" not in str(e.value)
    assert scoring.input_transform_for(None, "pytorch-fid") == ("pytorch-fid", False)
    assert scoring.input_transform_for(None, None) == ("tf", False)

    # a reference of another network (the digits one) records none and needs no Inception
    digits = reference.build_reference(CountingNet("digits-cnn-x"), x.shape, iter([x]), preprocessing="digits")
    reference.save(digits, str(tmp_path / "digits.npz"))
    assert reference.recorded_network(str(tmp_path / "digits.npz")) == ("digits-cnn-x", None)
    assert scoring.input_transform_for(str(tmp_path / "digits.npz"), None) == ("tf", False)


def test_adm_batch_is_tf_and_refuses_other_features(tmp_path):
    path = str(tmp_path / "VIRTUAL_batch.npz")
    _adm_batch(path)
    assert reference.recorded_network(path) == ("adm", "tf")
    assert scoring.input_transform_for(path, None) == ("tf", True)
    with pytest.raises(ValueError, match=r"--input_transform='pytorch-fid' but .* input transform 'tf'"):
        scoring.input_transform_for(path, "pytorch-fid")
    net = CountingNet("inception-v3-fid:w.pth:pytorch-fid", input_transform="pytorch-fid")
    with pytest.raises(ValueError, match=r"made with input transform 'tf', the samples' features with input "
                                         r"transform 'pytorch-fid'"):  # fmt: skip
        reference.load_reference(path, net, str(tmp_path / "out"))
    assert net.calls == 0  # refused before any feature was computed
    ref = reference.load_reference(path, CountingNet("inception-v3-fid:w.pth:tf", input_transform="tf"), str(tmp_path))
    assert ref.input_transform == "tf" and ref.feature_network == "adm"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_reference_from_a_url(tmp_path, monkeypatch):
    """``--ref http://...``: the batch is downloaded into the cache once and read from there."""
    served = tmp_path / "served"
    served.mkdir()
    x = _adm_batch(str(served / "VIRTUAL_batch.npz"))
    monkeypatch.setenv("GMFLOW_JAX_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(_QuietHandler, directory=str(served))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/VIRTUAL_batch.npz"
        net = CountingNet("inception-v3-fid:w.pth:tf", input_transform="tf")
        ref = reference.load_reference(url, net, str(tmp_path / "out"))
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()
    assert ref.path.startswith(str(tmp_path / "cache" / "downloads")) and ref.path.endswith("VIRTUAL_batch.npz")
    np.testing.assert_allclose(ref.pool, net(x)["pool"])
    assert reference.load_reference(url, net, str(tmp_path / "out")).path == ref.path  # the server is gone
