"""The feature network of the digits evaluation: a small CNN classifier of scikit-learn's 8×8 digits, Flax NNX.

    net = load_digits_net()  # trained once (7–10 s on 2 CPU cores), then read from the cache
    out = net(images)  # uint8 (N, 8, 8, 3) -> {'pool': (N, 64), 'logits': (N, 10)}, NumPy float32

Why: the FID Inception's features mean nothing on 8×8 gray digits (it would see a 299×299 blur of a few pixels,
far from ImageNet). A network trained on the digits themselves gives the digits analogues of the ImageNet metrics:
the Fréchet distance of its penultimate features (``pool``) between samples and the real digits is the "FID",
its ``logits`` give the Inception Score, its features Precision/Recall. It has the same contract as the Inception
(:mod:`~gmflow_jax.evaluate.features`): uint8 RGB in, ``name`` (``digits-cnn-<sha256 of the parameters>``, stored
in reference files so that features of another network are refused) and ``resolution = (8, 8)``.

What: conv 3×3 (1→32, SAME) · SiLU · 2×2 max-pool · conv 3×3 (32→64, SAME) · SiLU · flatten (4·4·64) · Linear → 64 ·
SiLU = ``pool`` · Linear → 10 = ``logits`` (85K parameters); float32, ``precision=HIGHEST``. SiLU, not ReLU: with
ReLU 16–28 of the 64 features were dead (constant 0), which makes the feature covariance singular. Input: uint8 →
mean of the 3 channels → v/127.5 − 1 (any RGB input works; gray repeated 3× is exact). Trained with Adam
(cosine-decayed learning rate), cross-entropy, random ±1 pixel translations, seed 0, on all 1797 digits quantised
as the evaluation sees them (``evaluate.sampling.to_uint8_rgb``): ``STEPS`` = 800 steps of ``BATCH`` = 128
(57 epochs), 7 s on 2 CPU cores (10 s in a fresh process, with JAX's start-up). Trained the same way on a
stratified 75 % split, it classifies the other 25 % with 99.3 % accuracy;
the all-digits network classifies all 1797 real digits correctly.

The cache, ``<cache_dir>/digits_net_v1.npz`` (``$GMFLOW_JAX_CACHE`` or ``~/.cache/gmflow_jax``), holds the
parameters as flat arrays keyed by their NNX state paths (``conv1.kernel``, ...) and the network's ``name``, which
loading checks against the parameters' hash; an unreadable or mismatched file is retrained (with a warning).
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
import zipfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gmflow_jax.cache import default_cache_dir
from gmflow_jax.evaluate.sampling import to_uint8_rgb

RESOLUTION = (8, 8)
FEATURES = 64
NUM_CLASSES = 10
CACHE_FILE = "digits_net_v1.npz"
CHUNK = 1024
STEPS = 800
BATCH = 128
LEARNING_RATE = 3e-3
_HI = jax.lax.Precision.HIGHEST


class DigitsCNN(nnx.Module):
    """The classifier proper: float32 (N, 8, 8, 1) in [−1, 1] → (pool (N, 64), logits (N, 10))."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, (3, 3), padding="SAME", precision=_HI, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), padding="SAME", precision=_HI, rngs=rngs)
        self.feature = nnx.Linear(4 * 4 * 64, FEATURES, precision=_HI, rngs=rngs)
        self.head = nnx.Linear(FEATURES, NUM_CLASSES, precision=_HI, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = jax.nn.silu(self.conv1(x))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = jax.nn.silu(self.conv2(x))
        pool = jax.nn.silu(self.feature(x.reshape(x.shape[0], -1)))
        return pool, self.head(pool)


def check_images(images: np.ndarray) -> None:
    """ValueError naming the dtype or shape unless ``images`` is uint8 (N, 8, 8, 3)."""
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, 8, 8, 3) in [0, 255]; got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, 8, 8, 3); got {tuple(images.shape)}")
    if tuple(images.shape[1:3]) != RESOLUTION:
        raise ValueError(
            f"the digits feature network takes 8×8 images, i.e. shape (N, {RESOLUTION[0]}, {RESOLUTION[1]}, 3); "
            f"got {tuple(images.shape)}"
        )


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 (N, H, W, 3) → float32 (N, H, W, 1) in [−1, 1]: the channels' mean v, then v/127.5 − 1."""
    v = jnp.sum(images.astype(jnp.float32), axis=-1, keepdims=True) / 3.0  # exact for gray repeated 3 times
    return v / 127.5 - 1.0


def flat_params(module: DigitsCNN) -> dict[str, np.ndarray]:
    """The module's parameters as NumPy arrays keyed by their dot-joined NNX state paths (``conv1.kernel``)."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(map(str, path)): np.asarray(var.get_value()) for path, var in flat}


def params_digest(params: dict[str, np.ndarray]) -> str:
    """sha256 (hex) of the parameters: keys, dtypes, shapes and bytes, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(params):
        a = np.ascontiguousarray(params[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class DigitsFeatureNet:
    """A feature network (:class:`~gmflow_jax.evaluate.features.FeatureNetwork`) around a trained :class:`DigitsCNN`:
    ``net(uint8 (N, 8, 8, 3))`` → ``{'pool': (N, 64), 'logits': (N, 10)}`` float32 NumPy, in padded chunks of
    ``chunk`` images through one jitted function (compiled once)."""

    def __init__(self, module: DigitsCNN, chunk: int = CHUNK):
        self.module = module
        self.name: str = f"digits-cnn-{params_digest(flat_params(module))[:12]}"
        self.resolution: tuple[int, int] = RESOLUTION
        self.chunk = chunk
        graphdef, state = nnx.split(module)
        self._state = state

        @jax.jit
        def features(state: nnx.State, images: jax.Array) -> dict[str, jax.Array]:
            pool, logits = nnx.merge(graphdef, state)(preprocess(images))
            return {"pool": pool, "logits": logits}

        self._fn = features

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        check_images(images)
        outs = []
        for i in range(0, max(len(images), 1), self.chunk):
            part = images[i : i + self.chunk]
            padded = np.zeros((self.chunk, *RESOLUTION, 3), np.uint8)
            padded[: len(part)] = part
            out = self._fn(self._state, padded)
            outs.append({k: np.asarray(v, np.float32)[: len(part)] for k, v in out.items()})
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class (N,) int64 of uint8 (N, 8, 8, 3) images."""
        return self(images)["logits"].argmax(axis=1)


def _translate(x: jax.Array, key: jax.Array) -> jax.Array:
    """Each image of (B, H, W, C) shifted by its own random offset in {−1, 0, 1}², background (−1) filled in."""
    b, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(key, (b, 2), 0, 3)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offsets)


def train_digits_net(
    seed: int = 0, steps: int = STEPS, indices: Sequence[int] | np.ndarray | None = None, verbose: bool = False
) -> DigitsFeatureNet:
    """Trains the network on the real digits (all 1797, or those at ``indices``), quantised to uint8 as samples are.

    Mini-batches of ``BATCH`` drawn with replacement, random ±1 pixel translations, Adam with a cosine-decayed
    learning rate; deterministic for a given seed (on one backend).
    """
    from gmflow_jax.data import digits_arrays

    t0 = time.time()
    images, labels = digits_arrays()
    if indices is not None:
        images, labels = images[np.asarray(indices)], labels[np.asarray(indices)]
    x = preprocess(jnp.asarray(to_uint8_rgb(images)))
    y = jnp.asarray(labels, jnp.int32)
    key, init_key = jax.random.split(jax.random.key(seed))
    module = DigitsCNN(rngs=nnx.Rngs(init_key))
    graphdef, params = nnx.split(module, nnx.Param)
    optimizer = optax.adam(optax.cosine_decay_schedule(LEARNING_RATE, steps))
    opt_state = optimizer.init(params)

    def loss_fn(params: nnx.State, xb: jax.Array, yb: jax.Array) -> jax.Array:
        _, logits = nnx.merge(graphdef, params)(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def train_step(params, opt_state, key):
        pick, shift = jax.random.split(key)
        idx = jax.random.randint(pick, (BATCH,), 0, x.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(params, _translate(x[idx], shift), y[idx])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for i, step_key in enumerate(jax.random.split(key, steps)):
        params, opt_state, loss = train_step(params, opt_state, step_key)
        if verbose and (i + 1) % 100 == 0:
            print(f"[digits_net] step {i + 1}/{steps}: loss {float(loss):.4f}", flush=True)
    nnx.update(module, params)
    net = DigitsFeatureNet(module)
    if verbose:
        print(f"[digits_net] trained {net.name} on {len(labels)} digits in {time.time() - t0:.1f} s", flush=True)
    return net


def save_digits_net(net: DigitsFeatureNet, path: str) -> None:
    """Writes the parameters (flat arrays) and ``name`` to the ``.npz`` ``path`` atomically (tmp, then replace)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, name=np.array(net.name), **flat_params(net.module))
    os.replace(tmp, path)


def flat_params_abstract(module: DigitsCNN) -> dict[str, jax.ShapeDtypeStruct]:
    """Like :func:`flat_params` for an abstract module (``nnx.eval_shape``): shapes and dtypes only."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(map(str, path)): var.get_value() for path, var in flat}


def read_digits_net(path: str) -> DigitsFeatureNet:
    """The network saved at ``path``; ValueError if its keys, shapes or digest do not match this module's network."""
    module = nnx.eval_shape(lambda: DigitsCNN(rngs=nnx.Rngs(0)))
    want = {k: (v.shape, v.dtype) for k, v in flat_params_abstract(module).items()}
    with np.load(path, allow_pickle=False) as f:
        stored = {k: f[k] for k in f.files}
    name = str(stored.pop("name", ""))
    if set(stored) != set(want):
        raise ValueError(f"{path}: parameters {sorted(stored)}, expected {sorted(want)}")
    for k, (shape, dtype) in want.items():
        if stored[k].shape != shape or stored[k].dtype != dtype:
            raise ValueError(f"{path}: {k!r} is {stored[k].dtype}{stored[k].shape}, expected {dtype}{shape}")
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    for path_, var in flat:
        var.set_value(jnp.asarray(stored[".".join(map(str, path_))]))
    nnx.update(module, nnx.from_flat_state(flat))
    net = DigitsFeatureNet(module)
    if net.name != name:
        raise ValueError(f"{path}: stored name {name!r} does not match its parameters' ({net.name!r})")
    return net


def load_digits_net(cache_dir: str | None = None) -> DigitsFeatureNet:
    """The cached network ``<cache_dir>/digits_net_v1.npz``; trained on all digits and saved the first time, and
    retrained (with a warning) if the file is unreadable or does not match."""
    path = os.path.join(cache_dir or default_cache_dir(), CACHE_FILE)
    if os.path.exists(path):
        try:
            return read_digits_net(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            warnings.warn(f"digits feature network cache {path} is unusable ({e}); retraining it", stacklevel=2)
    net = train_digits_net(verbose=True)
    save_digits_net(net, path)
    return net
