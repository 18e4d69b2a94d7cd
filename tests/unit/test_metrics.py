"""gmflow_jax.evaluate.metrics against independent references (direct scipy, closed forms, brute force, colorsys)."""

from __future__ import annotations

import colorsys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from gmflow_jax.evaluate import metrics as M

# ------------------------------------------------------------------------------------------------ Fréchet distance


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_vs_direct_sqrtm():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    # Independent form: tr((s1^½ s2 s1^½)^½), the symmetric version of tr((s1 s2)^½).
    r1 = scipy.linalg.sqrtm(s1).real
    cross = scipy.linalg.sqrtm(r1 @ s2 @ r1).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross)
    got = M.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-9)
    # JAX float32 inputs go through the same float64 host computation.
    got32 = M.frechet_distance(jnp.asarray(mu1), jnp.asarray(s1), jnp.asarray(mu2), jnp.asarray(s2))
    assert got32 == pytest.approx(want, rel=1e-4)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, 20), rng.uniform(0.1, 3.0, 20)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)


def test_frechet_1d_is_wasserstein2_squared():
    # W2²(N(m1, s1²), N(m2, s2²)) = (m1 − m2)² + (s1 − s2)².
    m1, s1, m2, s2 = 0.3, 1.7, -1.1, 0.4
    got = M.frechet_distance(np.array([m1]), np.array([[s1**2]]), np.array([m2]), np.array([[s2**2]]))
    assert got == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-12)


def test_frechet_singular_product_and_errors():
    # Rank-deficient covariances: the product's root may not be finite; the result must still be the diagonal form.
    a, b = np.array([1.0, 0.0, 4.0]), np.array([0.0, 0.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = M.frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b))
    assert got == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), abs=1e-5)
    with pytest.raises(ValueError, match="mu2"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(3))
    with pytest.raises(ValueError, match="sigma2"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="sigma1"):
        M.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


def test_frechet_eps_fallback_and_imaginary_refusal(monkeypatch):
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def nan_first(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", nan_first)
    a, b = np.array([1.0, 2.0]), np.array([3.0, 0.5])
    with pytest.warns(UserWarning, match="singular product"):
        got = M.frechet_distance(np.zeros(2), np.diag(a), np.zeros(2), np.diag(b), eps=1e-3)
    np.testing.assert_allclose(calls[1], np.diag((a + 1e-3) * (b + 1e-3)))  # eps·I added to both covariances
    want = np.sum(a + b) - 2 * np.sum(np.sqrt((a + 1e-3) * (b + 1e-3)))  # traces without eps, as ADM
    assert got == pytest.approx(want, rel=1e-12)

    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: real_sqrtm(m) + 0.1j * np.eye(len(m)))
    with pytest.raises(ValueError, match="imaginary"):
        M.frechet_distance(np.zeros(2), np.diag(a), np.zeros(2), np.diag(b))
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: real_sqrtm(m) + 1e-6j * np.eye(len(m)))
    assert M.frechet_distance(np.zeros(2), np.diag(a), np.zeros(2), np.diag(b)) == pytest.approx(
        np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-12
    )


def test_feature_statistics():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(500, 7)).astype(np.float32)
    mu, sigma = M.feature_statistics(jnp.asarray(f))
    assert mu.dtype == np.float64 and sigma.shape == (7, 7)
    f64 = f.astype(np.float64)
    np.testing.assert_allclose(mu, f64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, (f64 - f64.mean(0)).T @ (f64 - f64.mean(0)) / 499, rtol=1e-10)
    with pytest.raises(ValueError, match="features"):
        M.feature_statistics(np.zeros(5))


# ------------------------------------------------------------------------------------------------ Inception Score


def test_inception_score_known_values():
    n, c, classes = 1000, 1008, 20
    logits = np.zeros((n, c), np.float32)
    logits[np.arange(n), np.arange(n) % classes] = 60.0  # p(y|x) ≈ one-hot, p(y) uniform on 20 classes
    mean, std = M.inception_score(logits, splits=10)
    assert mean == pytest.approx(classes, rel=1e-6) and std == pytest.approx(0.0, abs=1e-5)
    same = np.tile(np.random.default_rng(3).normal(size=(1, c)), (100, 1))
    mean, std = M.inception_score(jnp.asarray(same), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_vs_direct_formula():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(300, 50)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = [np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1))) for q in np.split(p, 3)]
    mean, std = M.inception_score(logits, splits=3)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10) and std == pytest.approx(np.std(scores), rel=1e-8)
    with pytest.raises(ValueError, match="splits"):
        M.inception_score(logits[:5], splits=10)


# ------------------------------------------------------------------------------------------------ precision / recall


def _brute_pr(real, fake, k, tol=1e-5):
    """Full float64 distance matrices and np.partition. Also counts, per set, the points with some membership test
    |d² − r²| <= tol·r²: only those may flip under float32 rounding (~1e-6 relative for these 16-D features)."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)

    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_real = np.partition(d2(real, real), k, axis=1)[:, k]
    r_fake = np.partition(d2(fake, fake), k, axis=1)[:, k]
    d_rf = d2(real, fake)
    precision = np.mean(np.any(d_rf <= r_real[:, None], axis=0))
    recall = np.mean(np.any(d_rf <= r_fake[None, :], axis=1))
    near_fake = int(np.any(np.abs(d_rf - r_real[:, None]) <= tol * r_real[:, None], axis=0).sum())
    near_real = int(np.any(np.abs(d_rf - r_fake[None, :]) <= tol * r_fake[None, :], axis=1).sum())
    return precision, recall, near_fake, near_real


@pytest.mark.parametrize("k", [3, 5])
def test_precision_recall_vs_brute_force(k):
    rng = np.random.default_rng(5)
    n_real, n_fake = 1500, 1100
    real = rng.normal(size=(n_real, 16)).astype(np.float32)
    fake = (rng.normal(size=(n_fake, 16)) * 0.7 + 0.4).astype(np.float32)  # narrower and shifted: P != R
    want_p, want_r, near_fake, near_real = _brute_pr(real, fake, k)
    assert 0.05 < want_p < 0.999 and 0.05 < want_r < 0.999 and abs(want_p - want_r) > 0.5
    # Stated tolerance: at most one point per set lies within 1e-5 (relative) of a ball's boundary, so the blocked
    # float32 result may differ from the float64 brute force by at most 1/N (and is equal whenever none does).
    assert near_fake <= 1 and near_real <= 1
    # batch_size 256 divides neither set: several blocks per set, padded last blocks, top_k merged across blocks.
    for got_p, got_r in (
        M.precision_recall(jnp.asarray(real), fake, k=k, batch_size=256),
        M.precision_recall(real, fake, k=k, batch_size=10000),  # one block per set
    ):
        assert abs(got_p - want_p) * n_fake <= near_fake + 1e-9
        assert abs(got_r - want_r) * n_real <= near_real + 1e-9
        if near_fake == near_real == 0:
            assert (got_p, got_r) == (want_p, want_r)


def test_precision_recall_identical_sets_and_errors():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    assert M.precision_recall(x, x, k=3, batch_size=64) == (1.0, 1.0)
    with pytest.raises(ValueError, match="fake_features"):
        M.precision_recall(x, x[:, :4])
    with pytest.raises(ValueError, match="real_features"):
        M.precision_recall(x[:3], x, k=3)


# ------------------------------------------------------------------------------------------------ saturation


def test_hsv_saturation_vs_colorsys():
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, size=(3, 4, 5, 3), dtype=np.uint8)
    img[0, 0, 0] = 0  # black: saturation 0
    img[0, 0, 1] = (7, 7, 7)  # grey: 0
    want = np.mean([colorsys.rgb_to_hsv(*(px / 255.0))[1] for px in img.reshape(-1, 3)])
    assert M.hsv_saturation(img) == pytest.approx(want, rel=1e-12)
    assert M.hsv_saturation(jnp.asarray(img), chunk=2) == pytest.approx(want, rel=1e-12)
    grey = np.repeat(img[..., :1], 3, axis=-1)
    assert M.saturation_difference(img, grey) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="uint8"):
        M.hsv_saturation(img.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        M.hsv_saturation(img[..., :2])


# ------------------------------------------------------------------------------------------------ reference files


def _stats(rng, d, ds):
    return dict(
        mu=rng.normal(size=d), sigma=_random_spd(rng, d), mu_s=rng.normal(size=ds), sigma_s=_random_spd(rng, ds)
    )


def test_reference_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    stats = _stats(rng, 6, 5)
    images = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "ref.npz"
    M.save_reference(path, **stats, images=images, preprocessing="center_crop_256", dims=None)
    ref = M.load_adm_reference(path, dims=None)
    for key, val in stats.items():
        np.testing.assert_array_equal(ref[key], val)
    np.testing.assert_array_equal(ref["images"], images)
    assert ref["preprocessing"] == "center_crop_256"
    assert M.load_adm_reference(path, dims=None, load_images=False)["images"] is None
    # ADM's own files: arrays only, no preprocessing entry → 'adm'.
    adm = tmp_path / "adm.npz"
    np.savez(adm, **stats)
    ref = M.load_adm_reference(adm, dims=None)
    assert ref["preprocessing"] == "adm" and ref["images"] is None
    with pytest.raises(ValueError, match="'adm'.*'center_crop_256'"):
        M.check_same_preprocessing(ref["preprocessing"], "center_crop_256")
    M.check_same_preprocessing("adm", "adm")


def test_reference_default_dims(tmp_path):
    rng = np.random.default_rng(9)
    path = tmp_path / "ref.npz"
    ok = dict(mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    M.save_reference(path, **ok, preprocessing="adm")
    assert M.load_adm_reference(path)["sigma"].shape == (2048, 2048)
    with pytest.raises(ValueError, match="'mu'"):
        M.save_reference(path, **_stats(rng, 6, 5), preprocessing="adm")


def test_reference_format_errors(tmp_path):
    rng = np.random.default_rng(10)
    stats = _stats(rng, 6, 5)
    missing = tmp_path / "missing.npz"
    np.savez(missing, **{k: v for k, v in stats.items() if k != "sigma_s"})
    with pytest.raises(ValueError, match=r"missing\.npz.*'sigma_s'"):
        M.load_adm_reference(missing, dims=None)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **dict(stats, sigma=np.eye(5)))
    with pytest.raises(ValueError, match=r"bad\.npz.*'sigma'"):
        M.load_adm_reference(bad, dims=None)
    wrong_dim = tmp_path / "wrong_dim.npz"
    np.savez(wrong_dim, **stats)
    with pytest.raises(ValueError, match=r"wrong_dim\.npz.*'mu'"):
        M.load_adm_reference(wrong_dim)
    bad_images = tmp_path / "bad_images.npz"
    np.savez(bad_images, arr_0=np.zeros((2, 4, 4, 3), np.float32), **stats)
    with pytest.raises(ValueError, match="arr_0"):
        M.load_adm_reference(bad_images, dims=None)
    with pytest.raises(ValueError, match="preprocessing"):
        M.save_reference(tmp_path / "x.npz", **stats, preprocessing="", dims=None)
