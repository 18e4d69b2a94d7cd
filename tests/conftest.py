"""Shared fixtures: float64 NumPy/SciPy references written from the probability definitions.

JAX stays in float32 (``jax_enable_x64`` is deliberately not enabled); every reference
here is float64 NumPy/SciPy and independent of the code under test:

* mixture densities are sums of ``scipy.stats`` densities;
* the oracle posteriors of a GM data distribution come from Gaussian conditioning of
  the joint covariance of ``(x0, x_lo, x_hi)``, built from the forward process
  ``x_lo = (1 − t_lo) x0 + t_lo ε0``, ``x_hi = a x_lo + b ε1`` (a Markov chain whose
  marginals are ``x_t = (1 − t) x0 + t ε``), not from the library's c1/c2/c3;
* the exact probability-flow ODE is integrated by ``scipy.integrate.solve_ivp``;
* the Knothe–Rosenblatt map uses ``scipy.stats.norm`` CDFs and ``norm.ppf``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The tests run on the CPU (simulated devices). libtpu, a test dependency for the ahead-of-time TPU
# compiles, would otherwise make every JAX process probe for a TPU first.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The digits feature network of the evaluation is trained once and cached; the tests (and their subprocesses) keep
# it out of the user's ~/.cache.
os.environ.setdefault("GMFLOW_JAX_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "gmflow_jax"))
# JAX's persistent compilation cache, shared by the test processes and every trainer, sampler and evaluation they
# start: dozens of subprocesses compile the same small programs (a trainer of the same model is one program
# whatever its num_steps). A size limit turns on JAX's file lock, which the concurrent processes need (without
# it an entry is written in place while another process may read it).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
# The XLA:CPU setting of the project's commands, so that a test's own compiles match its subprocesses'.
from gmflow_jax.cli import keep_cpu_reductions_in_xla  # noqa: E402

keep_cpu_reductions_in_xla()


def _import_torchvision() -> None:
    """Makes ``import torchvision`` work for the PyTorch references (pytorch-fid, diffusers) on the test stack.

    The test requirements keep ``torch==2.13.0`` (the CPU build, small and quick to install) with
    ``torchvision==0.28.0`` from the registry, a CUDA build whose import stops in ``torchvision._meta_registrations``:
    it registers fake (meta-device) kernels for torchvision's C ops (``nms``, ``roi_align``, ...), which this torch
    does not have (``operator torchvision::nms does not exist``). No reference here calls those ops, so an empty
    module stands in for that one submodule; every line of torchvision's network code runs unchanged. (The other way
    out, torch 2.14.1 + torchvision 0.29.1, costs 5.5 GB and a minute of every fresh ``make test``.) Nothing is
    changed where torchvision imports by itself.
    """
    import sys
    import types

    try:
        import torchvision  # noqa: F401
    except ImportError:
        return  # not installed: the tests that need it skip
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401


_import_torchvision()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import integrate, stats  # noqa: E402
from scipy.special import logsumexp, softmax  # noqa: E402

from gmflow_jax.gm import GM  # noqa: E402

TESTDATA_NAME = "official_gm_ops.npz"
TESTDATA_ENV = "GMFLOW_TESTDATA"


# --- official test vectors -------------------------------------------------------------


def _testdata_path() -> Path:
    override = os.environ.get(TESTDATA_ENV)
    if override:
        path = Path(override)
        return path / TESTDATA_NAME if path.is_dir() else path
    return Path(__file__).resolve().parent / "data" / TESTDATA_NAME


@pytest.fixture(scope="session")
def official() -> dict[str, np.ndarray]:
    """The authors' reference vectors (tests/data/README.md), as a dict of arrays."""
    path = _testdata_path()
    if not path.is_file():
        pytest.skip(f"official GM test vectors not found at {path} (set {TESTDATA_ENV} to the npz or its folder)")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# --- generic helpers -------------------------------------------------------------------


@pytest.fixture(scope="session")
def make_gm():
    """``make_gm(rng, batch, k, c, spread=1.5, logstd=(-1, 0))`` -> (means, logweights, logstds) float64.

    ``logstds`` has one value per first batch index, shape (N, 1, .., 1, 1) (method.md §1).
    """

    def _make(rng, batch, k, c, spread=1.5, logstd=(-1.0, 0.0)):
        batch = tuple(batch)
        means = spread * rng.standard_normal(batch + (k, c))
        logits = rng.standard_normal(batch + (k,))
        logweights = logits - logsumexp(logits, axis=-1, keepdims=True)
        logstds = rng.uniform(*logstd, size=(batch[0],) + (1,) * (len(batch) + 1))
        return means, logweights, logstds

    return _make


def mixture_logpdf_ref(means, logweights, std, x) -> np.ndarray:
    """log of ``Σ_k w_k N(x; μ_k, std² I)`` for one mixture (means (K, C)) at points x (P, C)."""
    means, x = np.asarray(means, np.float64), np.atleast_2d(np.asarray(x, np.float64))
    c = means.shape[-1]
    comps = [
        stats.multivariate_normal(mean=m, cov=float(std) ** 2 * np.eye(c)).logpdf(x).reshape(x.shape[0]) for m in means
    ]
    return logsumexp(np.stack(comps, axis=-1) + np.asarray(logweights, np.float64), axis=-1)


@pytest.fixture(scope="session")
def mixture_logpdf():
    return mixture_logpdf_ref


def batched_logpdf_ref(means, logweights, logstds, x) -> np.ndarray:
    """``mixture_logpdf_ref`` at every pixel of a batched GM: means (*B, K, C), x (*B, C) -> (*B,)."""
    means = np.asarray(means, np.float64)
    batch = means.shape[:-2]
    std = np.broadcast_to(np.exp(np.asarray(logstds, np.float64)), batch + (1, 1))
    out = np.empty(batch)
    for idx in np.ndindex(*batch):
        out[idx] = mixture_logpdf_ref(means[idx], logweights[idx], std[idx][0, 0], x[idx][None])[0]
    return out


@pytest.fixture(scope="session")
def batched_logpdf():
    return batched_logpdf_ref


def mixture_cdf_1d(means, weights, std, x) -> np.ndarray:
    """CDF of the 1-D mixture ``Σ_k w_k N(μ_k, std²)`` (means (K,)) at x (any shape)."""
    x = np.asarray(x, np.float64)[..., None]
    return np.sum(np.asarray(weights) * stats.norm.cdf(x, loc=np.asarray(means), scale=std), axis=-1)


@pytest.fixture(scope="session")
def mixture_cdf():
    return mixture_cdf_1d


def kr_forward_ref(means, logweights, logstds, x) -> np.ndarray:
    """Knothe–Rosenblatt map of points x (N, *P, C) of a GM (N, *P, K, C) to N(0, I), float64.

    Frame: eigenvectors (descending eigenvalues) of the mixture covariance
    ``E[x xᵀ] − E[x] E[x]ᵀ`` averaged over the pixel axes ``*P`` of each sample. Along
    each rotated axis in turn, the conditional CDF of the mixture given the earlier
    coordinates (component posteriors from scipy densities) is pushed through ``norm.ppf``.
    Eigenvector signs are arbitrary, so compare absolute values.
    """
    means, x = np.asarray(means, np.float64), np.asarray(x, np.float64)
    c = means.shape[-1]
    w = softmax(np.asarray(logweights, np.float64), axis=-1)
    s = np.broadcast_to(np.exp(np.asarray(logstds, np.float64)), means.shape[:-2] + (1, 1))[..., 0, 0]
    mean = np.einsum("...k,...kc->...c", w, means)
    second = np.einsum("...k,...kc,...kd->...cd", w, means, means) + (s**2)[..., None, None] * np.eye(c)
    cov = second - mean[..., :, None] * mean[..., None, :]
    cov = cov.reshape(cov.shape[0], -1, c, c).mean(axis=1)  # (N, C, C), averaged over pixels
    _, vecs = np.linalg.eigh(cov)
    q = vecs[..., ::-1]
    q = q.reshape((q.shape[0],) + (1,) * (means.ndim - 3) + (c, c))
    y = np.einsum("...c,...cd->...d", x, q)
    nu = np.einsum("...kc,...cd->...kd", means, q)
    logw = np.log(w)
    z = np.empty_like(y)
    for d in range(c):
        post = softmax(logw, axis=-1)
        cdf = np.sum(post * stats.norm.cdf(y[..., d, None], loc=nu[..., d], scale=s[..., None]), axis=-1)
        z[..., d] = stats.norm.ppf(np.clip(cdf, 5e-7, 1.0 - 5e-7))
        logw = logw + stats.norm.logpdf(y[..., d, None], loc=nu[..., d], scale=s[..., None])
    return z


@pytest.fixture(scope="session")
def kr_forward_reference():
    return kr_forward_ref


# --- a Gaussian-mixture data distribution with closed-form posteriors ------------------


@dataclass(frozen=True)
class GMData:
    """``p(x0 | y) = Σ_{k: class_k = y} π_k N(m_k, s0² I)`` in 2-D; label ``num_classes`` = all."""

    means: np.ndarray  # (K, C)
    weights: np.ndarray  # (K,)
    std: float  # s0, shared by all components
    classes: np.ndarray  # (K,) class of each component

    @property
    def num_classes(self) -> int:
        return int(self.classes.max()) + 1

    @property
    def null_label(self) -> int:
        return self.num_classes

    def log_prior(self, labels, n: int) -> np.ndarray:
        """Normalised log mixture weights given the labels, (n, K)."""
        logw = np.broadcast_to(np.log(self.weights), (n, len(self.weights))).copy()
        if labels is not None:
            labels = np.asarray(labels)[:, None]
            keep = (labels == self.null_label) | (labels == self.classes[None, :])
            logw = np.where(keep, logw, -np.inf)
        return logw - logsumexp(logw, axis=-1, keepdims=True)

    def sample(self, rng, n: int, labels=None) -> np.ndarray:
        logw = self.log_prior(labels, n)
        u = rng.uniform(size=(n, 1))
        k = np.minimum((np.cumsum(np.exp(logw), axis=-1) < u).sum(axis=-1), len(self.weights) - 1)
        return self.means[k] + self.std * rng.standard_normal((n, self.means.shape[1]))

    def logpdf(self, x) -> np.ndarray:
        return mixture_logpdf_ref(self.means, np.log(self.weights), self.std, x)

    def class_weights(self, label=None) -> np.ndarray:
        """Mixture weights of ``p(x0 | label)`` (all components for None or the null label), (K,)."""
        return np.exp(self.log_prior(None if label is None else np.array([label]), 1)[0])

    def responsibilities(self, x, label=None) -> np.ndarray:
        """p(k | x0, label) for data points x (n, C): (n, K). Its mean over data samples estimates the weights."""
        comps = np.stack(
            [stats.multivariate_normal(m, self.std**2 * np.eye(len(m))).logpdf(x) for m in self.means], axis=-1
        )
        with np.errstate(divide="ignore"):
            return softmax(comps + np.log(self.class_weights(label)), axis=-1)

    def marginal_cdf(self, x, direction, label=None) -> np.ndarray:
        """CDF of the projection ``⟨direction, x0⟩`` (a 1-D mixture; direction of unit norm)."""
        direction = np.asarray(direction, np.float64)
        return mixture_cdf_1d(self.means @ direction, self.class_weights(label), self.std, x)

    def _joint(self, t_hi, t_lo):
        """Per-component covariance (n, 3, 3) of (x0, x_lo, x_hi) per coordinate, and mean factors (n, 3)."""
        t_hi, t_lo = np.asarray(t_hi, np.float64), np.asarray(t_lo, np.float64)
        a = (1.0 - t_hi) / (1.0 - t_lo)
        b = np.sqrt(t_hi**2 - (a * t_lo) ** 2)
        s0, zero = self.std * np.ones_like(t_hi), np.zeros_like(t_hi)
        # rows: x0, x_lo, x_hi as linear maps of independent standard normals (ξ, ε0, ε1)
        lin = np.stack(
            [
                np.stack([s0, zero, zero], -1),
                np.stack([(1.0 - t_lo) * s0, t_lo, zero], -1),
                np.stack([a * (1.0 - t_lo) * s0, a * t_lo, b], -1),
            ],
            -2,
        )
        factors = np.stack([np.ones_like(t_hi), 1.0 - t_lo, a * (1.0 - t_lo)], -1)
        return lin @ np.swapaxes(lin, -1, -2), factors

    def posterior(self, x_hi, t_hi, t_lo=0.0, labels=None):
        """Exact ``p(x_lo | x_hi)`` (``x_lo = x0`` when ``t_lo = 0``) as a GM in float64.

        x_hi (n, C); t_hi, t_lo scalars or (n,), ``t_lo < t_hi``. Returns means (n, K, C),
        logweights (n, K), std (n,).
        """
        x_hi = np.asarray(x_hi, np.float64)
        n = x_hi.shape[0]
        t_hi = np.broadcast_to(np.asarray(t_hi, np.float64), (n,))
        t_lo = np.broadcast_to(np.asarray(t_lo, np.float64), (n,))
        cov, fac = self._joint(t_hi, t_lo)
        s_hh, s_lh, s_ll = cov[:, 2, 2], cov[:, 1, 2], cov[:, 1, 1]
        gain = (s_lh / s_hh)[:, None, None]
        mean_hi = fac[:, 2, None, None] * self.means[None]  # (n, K, C)
        means = fac[:, 1, None, None] * self.means[None] + gain * (x_hi[:, None, :] - mean_hi)
        std = np.sqrt(s_ll - s_lh**2 / s_hh)
        loglik = stats.norm.logpdf(x_hi[:, None, :], loc=mean_hi, scale=np.sqrt(s_hh)[:, None, None]).sum(-1)
        logits = self.log_prior(labels, n) + loglik
        return means, logits - logsumexp(logits, axis=-1, keepdims=True), std

    def posterior_mean_x0(self, x, t, labels=None) -> np.ndarray:
        means, logweights, _ = self.posterior(x, t, 0.0, labels)
        return np.einsum("nk,nkc->nc", np.exp(logweights), means)

    def pf_ode(self, x1, t_end: float = 1e-6, rtol: float = 1e-10, atol: float = 1e-10) -> np.ndarray:
        """Exact probability-flow ODE ``dx/dt = (x − E[x0 | x_t]) / t`` from t = 1 to 0 (solve_ivp, float64)."""
        x1 = np.asarray(x1, np.float64)
        shape = x1.shape

        def rhs(t, y):
            x = y.reshape(shape)
            return ((x - self.posterior_mean_x0(x, t)) / t).ravel()

        sol = integrate.solve_ivp(rhs, (1.0, t_end), x1.ravel(), method="DOP853", rtol=rtol, atol=atol)
        assert sol.success, sol.message
        return self.posterior_mean_x0(sol.y[:, -1].reshape(shape), t_end)  # x0 = lim E[x0 | x_t]

    def denoise_fn(self):
        """The oracle network in JAX (float32): ``(x_t (N, C), tau (N,), labels) -> u-GM``.

        The x0-posterior is ``N(m_k + g (x_t − (1−t) m_k), s0² t² / V)`` with weights
        ``∝ π_k N(x_t; (1−t) m_k, V)``, ``V = (1−t)² s0² + t²``, ``g = (1−t) s0² / V``;
        then ``u = (x_t − x0) / t``. Checked against ``posterior`` in test_flow.py.
        """
        m = jnp.asarray(self.means, jnp.float32)
        logpi = jnp.asarray(np.log(self.weights), jnp.float32)
        classes = jnp.asarray(self.classes)
        s0sq, null = float(self.std**2), self.null_label

        def fn(x_t, tau, labels):
            t = (tau / 1000.0)[:, None, None]
            var_t = (1.0 - t) ** 2 * s0sq + t**2
            gain = (1.0 - t) * s0sq / var_t
            x = x_t[:, None, :]
            mu0 = m + gain * (x - (1.0 - t) * m)
            logits = jnp.broadcast_to(logpi, x_t.shape[:1] + logpi.shape)
            if labels is not None:
                keep = (labels[:, None] == null) | (labels[:, None] == classes[None, :])
                logits = jnp.where(keep, logits, -1e9)
            logits = logits - 0.5 * jnp.sum((x - (1.0 - t) * m) ** 2, axis=-1) / var_t[..., 0]
            logstd = 0.5 * jnp.log(s0sq * t**2 / var_t) - jnp.log(t)
            return GM((x - mu0) / t, jax.nn.log_softmax(logits, axis=-1), logstd)

        return fn


@pytest.fixture(scope="session")
def gm_data() -> GMData:
    return GMData(
        means=np.array([[-1.5, -0.5], [1.2, 1.0], [0.3, -1.6], [-0.4, 1.7]]),
        weights=np.array([0.35, 0.25, 0.25, 0.15]),
        std=0.3,
        classes=np.array([0, 1, 0, 1]),
    )
