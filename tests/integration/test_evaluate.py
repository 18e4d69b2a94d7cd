"""``gmflow_jax.evaluate``: samples in the ADM format, one compiled sweep per setting, resumable, and the same
images on 1 device and on 8; the metrics: the digits default (digits feature network and reference), the FID
Inception path with a reference made by ``python -m gmflow_jax.evaluate.reference``, caching, plots, refusals."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from train_helpers import error_line, run

from gmflow_jax.evaluate import metrics
from gmflow_jax.evaluate.sampling import Setting, eval_labels, evaluate_samples, write_metrics
from gmflow_jax.sampling import Sampler

N, CHUNK = 40, 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from gmflow_jax.train import train
    from gmflow_jax.train.config import load_config

    c = load_config("digits_gmdit:tiny")
    c.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    c.num_steps, c.checkpoint.async_save = 4, False
    wd = tmp_path_factory.mktemp("run")
    train(c, str(wd))
    return wd


def evaluate_cmd(workdir, out, *flags):
    return [sys.executable, "-m", "gmflow_jax.evaluate", f"--workdir={workdir}", f"--out={out}", *flags]


def test_sweep_in_adm_format_one_compilation_and_resume(workdir, tmp_path):
    sampler = Sampler.from_checkpoint(str(workdir))
    setting = Setting(solver="gm-sde", order=2, num_steps=2)
    rows = evaluate_samples(sampler, str(tmp_path), setting, [0.0, 0.3], num_samples=N, seed=1, chunk_size=CHUNK)
    assert sampler.num_traces == 1  # the whole sweep, all chunks (the last one padded): one compilation
    assert [r["guidance"] for r in rows] == [0.0, 0.3] and [r["network_evals_per_sample"] for r in rows] == [2, 4]
    with np.load(rows[1]["samples"]) as f:
        images, labels = f["arr_0"], f["labels"]
    assert images.shape == (N, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, eval_labels(N, 10, 1))
    assert np.bincount(labels, minlength=10).tolist() == [4] * 10
    assert os.path.isfile(os.path.join(os.path.dirname(rows[1]["samples"]), "grid.png"))
    path = write_metrics(str(tmp_path), rows)
    assert len(json.load(open(path))) == 2

    # a run killed after its first chunk: the rerun draws the rest and assembles the same files
    folder = os.path.dirname(rows[1]["samples"])
    reference = {name: np.load(r["samples"])["arr_0"] for name, r in zip("ab", rows, strict=True)}
    for r in rows:
        os.remove(r["samples"])
        for c in (1, 2):
            os.remove(os.path.join(os.path.dirname(r["samples"]), "chunks", f"chunk-{c:06d}.npz"))
    evaluate_samples(Sampler.from_checkpoint(str(workdir)), str(tmp_path), setting, [0.0, 0.3], num_samples=N, seed=1,
                     chunk_size=CHUNK)  # fmt: skip
    for name, r in zip("ab", rows, strict=True):
        np.testing.assert_array_equal(np.load(r["samples"])["arr_0"], reference[name])
    assert sorted(os.listdir(os.path.join(folder, "chunks"))) == [f"chunk-{c:06d}.npz" for c in range(3)]


def test_same_images_on_1_and_8_devices(workdir, tmp_path):
    flags = [f"--num_samples={N}", f"--chunk_size={CHUNK}", "--num_steps=2", "--guidance=0,0.3", "--seed=3"]
    results = {}
    for devices in (1, 8):
        out = tmp_path / f"d{devices}"
        result = run(evaluate_cmd(workdir, out, *flags), devices=devices)
        assert result.returncode == 0, result.stdout[-3000:]
        assert "samples/s, ETA" in result.stdout
        results[devices] = {w: np.load(out / f"gm-ode2_2x1_w{w}" / "samples.npz")["arr_0"] for w in ("0", "0.3")}
    # the same samples up to float32 rounding of two differently partitioned programs: at most one uint8
    # level on a few pixel values (measured: 0.23 % of the values with w̃ = 0.3)
    for w in ("0", "0.3"):
        diff = np.abs(results[1][w].astype(int) - results[8][w].astype(int))
        assert diff.max() <= 1 and np.mean(diff > 0) < 1e-2, (w, diff.max(), np.mean(diff > 0))


def test_errors_are_one_line(workdir, tmp_path):
    line = error_line(run(evaluate_cmd(workdir, tmp_path, "--guidance=0,1.5", "--num_samples=8")), 1)
    assert "guidance" in line and "[0, 1)" in line
    line = error_line(run(evaluate_cmd(workdir, tmp_path, "--ref=VIRTUAL_imagenet256_labeled.npz")), 1)
    assert "VIRTUAL_imagenet256_labeled.npz" in line
    shutil.rmtree(tmp_path, ignore_errors=True)


# --- metrics -------------------------------------------------------------------------------


def evaluate(workdir, out, *flags):
    base = [f"--num_samples={N}", f"--chunk_size={CHUNK}", "--num_steps=2", "--seed=1"]
    cmd = [sys.executable, "-m", "gmflow_jax.evaluate", f"--workdir={workdir}", f"--out={out}", *base, *flags]
    return run(cmd, timeout=600)


def test_digits_sweep_scores_caches_and_plots(workdir, tmp_path):
    out = tmp_path / "eval"
    result = evaluate(workdir, out, "--guidance=0,0.3")  # fewer than the 1797 real digits: samples, no metrics
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"no metrics: --num_samples={N} is fewer than the 1797" in result.stdout and "--allow_fewer" in result.stdout
    assert [r.get("fid") for r in json.loads((out / "metrics.json").read_text())] == [None, None]

    result = evaluate(workdir, out, "--guidance=0,0.3", "--allow_fewer_samples")
    assert result.returncode == 0, result.stdout[-3000:]
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["guidance"] for r in rows] == [0.0, 0.3]
    for r in rows:
        assert r["sfid"] is None and r["feature_network"].startswith("digits")
        for key in ("fid", "is", "precision", "recall", "saturation"):
            assert np.isfinite(r[key]), (key, r)
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and 1 <= r["is"] <= 10
    for name in ("metrics.csv", "fid_vs_guidance.png", "precision_recall.png", "saturation_vs_guidance.png"):
        assert (out / name).stat().st_size > 0, name
    assert "FID" in result.stdout and "GM-ODE 2, 2×1" in result.stdout

    # the row's FID is the Fréchet distance of the digits network's features of samples.npz to the real digits'
    from gmflow_jax.evaluate.digits_net import load_digits_net
    from gmflow_jax.evaluate.reference import digits_images

    net = load_digits_net()  # the tests' cache (conftest), as the subprocesses
    with np.load(rows[1]["samples"]) as f:
        fake = net(f["arr_0"])["pool"]
    real = net(digits_images())["pool"]
    want = metrics.frechet_distance(*metrics.feature_statistics(fake), *metrics.feature_statistics(real))
    assert rows[1]["fid"] == pytest.approx(want, rel=1e-6)
    assert (rows[1]["precision"], rows[1]["recall"]) == pytest.approx(metrics.precision_recall(real, fake, k=3))

    # one more guidance value: the two done settings are neither sampled nor featurised again
    folder = Path(rows[0]["samples"]).parent
    stamps = {p: p.stat().st_mtime_ns for p in (folder / "features").iterdir()}
    result = evaluate(workdir, out, "--guidance=0,0.3,0.6", "--allow_fewer_samples")
    assert result.returncode == 0, result.stdout[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (folder / "features").iterdir()} == stamps
    rows = json.loads((out / "metrics.json").read_text())
    assert sorted(r["guidance"] for r in rows) == [0.0, 0.3, 0.6]


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """pytorch-fid-format weights (random values) written by torch."""
    torch = pytest.importorskip("torch")
    from flax import nnx

    from gmflow_jax.evaluate.inception import InceptionV3, torch_key

    net = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
    g = torch.Generator().manual_seed(0)
    state = {}
    for path, v in nnx.to_flat_state(nnx.state(net)):
        shape = v.get_value().shape
        if path[-1] == "kernel":  # torch layout (O, I, H, W)
            shape = (shape[3], shape[2], shape[0], shape[1])
            state[torch_key(path)] = torch.randn(shape, generator=g) * (2.0 / np.prod(shape[1:])) ** 0.5
        elif path == ("fc_weight",):
            state["fc.weight"] = 0.05 * torch.randn(shape[::-1], generator=g)
        else:
            state[torch_key(path)] = 0.5 + torch.rand(shape, generator=g)
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(state, path)
    return path


def frechet_distance_by_eigenvalues(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """The Fréchet distance of N(mean, covariance of ``features`` (N, D)) to N(``mu``, ``sigma``) in float64, its
    trace term from the eigenvalues of the symmetric S^½ Σ S^½ (similar to S Σ, so tr (S Σ)^½ is the sum of their
    roots): a route independent of ``scipy.linalg.sqrtm`` and ten times faster at D = 2048."""
    x = np.asarray(features, np.float64)
    m, s = x.mean(0), np.cov(x, rowvar=False)
    w, v = np.linalg.eigh(s)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma @ root), 0, None)).sum()
    return float(np.sum((m - mu) ** 2) + np.trace(s) + np.trace(sigma) - 2 * trace_root)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def inception_url(inception_file, tmp_path, monkeypatch):
    """``inception_file`` served over HTTP on loopback (a real socket) for the test; downloads go to its own cache."""
    monkeypatch.setenv("GMFLOW_JAX_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(_QuietHandler, directory=str(inception_file.parent))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/{inception_file.name}"
    srv.shutdown()
    srv.server_close()
    thread.join()


def test_inception_path_with_our_reference(workdir, inception_file, inception_url, tmp_path):
    from gmflow_jax.evaluate.reference import digits_images

    np.savez(tmp_path / "real.npz", arr_0=digits_images()[:24])
    make_ref = [sys.executable, "-m", "gmflow_jax.evaluate.reference", f"--images={tmp_path / 'real.npz'}",
                f"--inception={inception_file}", "--feature_batch=8", "--preprocessing=digits"]  # fmt: skip
    result = run([*make_ref, f"--out={tmp_path / 'ref.npz'}"], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "preprocessing 'digits'" in result.stdout and "input transform 'tf'" in result.stdout
    # the weights by URL: downloaded into the cache, then read from there
    flags = [f"--inception={inception_url}", "--feature_batch=8", "--guidance=0.2", "--allow_fewer_samples"]
    result = evaluate(workdir, tmp_path / "eval", f"--ref={tmp_path / 'ref.npz'}", *flags)
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"downloaded {inception_url}" in result.stdout
    assert list((tmp_path / "cache" / "downloads").rglob(inception_file.name))
    (row,) = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert row["feature_network"] == f"inception-v3-fid:{inception_file.name}:tf" and row["sfid"] is not None

    # the same FID and sFID from the network called on samples.npz (in batches of 8: the evaluation's program, from
    # the compilation cache) and the reference's statistics, the distance by eigenvalues (not the library's sqrtm)
    from gmflow_jax.evaluate.features import ShardedNetwork
    from gmflow_jax.evaluate.inception import InceptionV3

    net = ShardedNetwork(InceptionV3.from_pytorch_fid(inception_file), 8)  # the "tf" input path: the reference's
    with np.load(row["samples"]) as f:
        feats = net(f["arr_0"])
    with np.load(tmp_path / "ref.npz") as ref:
        fid = frechet_distance_by_eigenvalues(feats["pool"], ref["mu"], ref["sigma"])
        sfid = frechet_distance_by_eigenvalues(feats["spatial"], ref["mu_s"], ref["sigma_s"])
    assert row["fid"] == pytest.approx(fid, rel=1e-4) and row["sfid"] == pytest.approx(sfid, rel=1e-4)

    # a reference of other preprocessing is refused before anything is drawn, naming both
    with np.load(tmp_path / "ref.npz") as ref:
        np.savez(tmp_path / "adm.npz", **dict(ref, preprocessing=np.array("adm")))
    line = error_line(evaluate(workdir, tmp_path / "eval2", f"--ref={tmp_path / 'adm.npz'}", *flags), 1)
    assert "'adm'" in line and "'digits'" in line and not (tmp_path / "eval2").exists()
    # so is an input transform other than the reference's ('tf'), naming both
    line = error_line(evaluate(workdir, tmp_path / "eval2", f"--ref={tmp_path / 'ref.npz'}", *flags,
                               "--input_transform=pytorch-fid"), 1)  # fmt: skip
    assert "--input_transform='pytorch-fid'" in line and "'tf'" in line and not (tmp_path / "eval2").exists()
    # with an explicit reference, too few samples for its protocol is an error (it asks for 24: all its images)
    flags.remove("--allow_fewer_samples")
    line = error_line(
        evaluate(workdir, tmp_path / "eval3", f"--ref={tmp_path / 'ref.npz'}", *flags, "--num_samples=16"), 1
    )
    assert "--num_samples=16 is fewer than the 24 samples" in line and not (tmp_path / "eval3").exists()
