"""The FID Inception network (InceptionV3 as ported by pytorch-fid from the 2015-12-05 TensorFlow graph), Flax NNX.

    net = InceptionV3.from_pytorch_fid("pt_inception-2015-12-05-6726825d.pth")  # or a URL; None: the official one
    out = net(images)  # uint8 (N, H, W, 3), any H, W -> {'pool': (N, 2048), 'spatial': (N, 2023), 'logits': (N, 1008)}

This is the network every published ImageNet FID is computed with (the ADM evaluator runs the TensorFlow graph,
pytorch-fid the same weights in PyTorch). It differs from torchvision's InceptionV3 in its weights (1008 classes) and
in four blocks (pytorch-fid's ``FIDInceptionA/C/E_1/E_2``): the 3×3 average pools of the A, C and first E blocks do
not count the zero padding, and the last E block max-pools instead.

Input: a bilinear resize to 299 × 299 (no antialiasing, also when shrinking: :func:`resize_matrix`) and a
normalisation to about [−1, 1], the two ways of the two pipelines (``input_transform``):

* ``"tf"`` (default): the TF graph's, as the ADM evaluator runs it (images fed at ``ExpandDims:0`` as float 0–255):
  TF1 ``ResizeBilinear`` with ``align_corners=False`` and no half-pixel centres (output pixel ``i`` samples the input
  at ``i · in/out``), then ``(x − 128) · 0.0078125``. What every published ImageNet FID (ADM, DiT, SiT, GMFlow,
  pi-Flow) was computed with.
* ``"pytorch-fid"``: pytorch-fid's: ``x / 255``, PyTorch's ``F.interpolate(..., align_corners=False)`` (samples at
  ``(i + 0.5) · in/out − 0.5``), then ``2x − 1``. What pytorch-fid's (and clean-fid's "legacy_pytorch") numbers use.

Outputs (what the ADM evaluator reads from the TF graph):

* ``pool``: ``(N, 2048)`` the global average pool of the last block (``pool_3``): FID, Precision/Recall.
* ``spatial``: ``(N, 2023)``: the first 7 channels of ``mixed_6/conv`` (the 1×1 branch of the fourth 17×17 block,
  ``Mixed_6d``, after its ReLU), flattened in (H, W, C) order: sFID.
* ``logits``: ``(N, 1008)``: ``pool`` times the last layer's weights, without its bias: IS.

Compute is float32 with ``precision=HIGHEST`` by default (on GPUs the default precision would use TF32, whose 10-bit
mantissa moves FID in its second decimal); weights are read by :mod:`gmflow_jax.evaluate.torch_weights`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

RESOLUTION = 299
INPUT_TRANSFORMS = ("tf", "pytorch-fid")
PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PYTORCH_FID_WEIGHTS}"
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7


def check_input_transform(input_transform: str) -> None:
    """ValueError naming ``input_transform`` unless it is one of :data:`INPUT_TRANSFORMS`."""
    if input_transform not in INPUT_TRANSFORMS:
        raise ValueError(f"input_transform must be one of {INPUT_TRANSFORMS}; got {input_transform!r}")


def resize_matrix(size_in: int, size_out: int, input_transform: str) -> np.ndarray:
    """(size_out, size_in) float32 weights of the 1-D bilinear resize of ``input_transform``.

    Output pixel ``i`` samples the input at ``src = i · size_in / size_out`` (``"tf"``: TF1 ``ResizeBilinear``,
    ``align_corners=False``, no half-pixel centres) or ``(i + 0.5) · size_in / size_out − 0.5`` clamped below at 0
    (``"pytorch-fid"``: PyTorch's ``align_corners=False``), between its two neighbours ``floor(src)`` and the next
    one (clamped to the last pixel) with weights ``1 − frac`` and ``frac``: no antialiasing filter when shrinking.
    Positions and weights are computed in float32 with each library's operation order, to the last bit.
    """
    check_input_transform(input_transform)
    f32 = np.float32
    i = np.arange(size_out, dtype=f32)
    if input_transform == "tf":  # TF's CalculateResizeScale and LegacyScaler: float(in) / float(out), then i · scale
        src = i * (f32(size_in) / f32(size_out))
    else:
        scale = f32(size_in / size_out)
        src = np.maximum(scale * (i + f32(0.5)) - f32(0.5), f32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = (src - lo.astype(f32)).astype(np.float64)
    m = np.zeros((size_out, size_in), np.float64)
    np.add.at(m, (np.arange(size_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(size_out), hi), frac)
    return m.astype(np.float32)


class BasicConv(nnx.Module):
    """Convolution without bias → BatchNorm (eps 1e-3, running statistics) → ReLU; torchvision's ``BasicConv2d``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        *,
        precision: jax.lax.Precision,
        rngs: nnx.Rngs,
    ):
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nnx.Conv(
            cin,
            cout,
            kernel,
            strides=stride,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=precision,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(cout, epsilon=1e-3, use_running_average=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3×3 average pool, stride 1, padding 1, the padding not counted (TensorFlow's, FIDInception's)."""
    window = lambda a: jax.lax.reduce_window(a, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")  # noqa: E731
    return window(x) / window(jnp.ones((1, *x.shape[1:3], 1), x.dtype))


def _max_pool(x: jax.Array, stride: int, padding: str) -> jax.Array:
    """3×3 max pool (``padding`` 'VALID', or 'SAME' = padding 1 at stride 1, ignoring the padding)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding)


class InceptionA(nnx.Module):
    """35×35 block (``Mixed_5b/c/d``, pytorch-fid's FIDInceptionA)."""

    def __init__(self, cin: int, pool_features: int, *, conv: Any):
        self.branch1x1 = conv(cin, 64, 1)
        self.branch5x5_1 = conv(cin, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(cin, pool_features, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_3x3(x))], axis=-1)


class InceptionB(nnx.Module):
    """35×35 → 17×17 reduction (``Mixed_6a``)."""

    def __init__(self, cin: int, *, conv: Any):
        self.branch3x3 = conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, _max_pool(x, 2, "VALID")], axis=-1)


class InceptionC(nnx.Module):
    """17×17 block with factorised 7×7 convolutions (``Mixed_6b–e``, pytorch-fid's FIDInceptionC)."""

    def __init__(self, cin: int, c7: int, *, conv: Any):
        self.branch1x1 = conv(cin, 192, 1)
        self.branch7x7_1 = conv(cin, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(cin, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(cin, 192, 1)

    def branches(self, x: jax.Array) -> list[jax.Array]:
        """The four branch outputs (1×1, 7×7, double 7×7, pool), each (N, 17, 17, 192)."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            d = layer(d)
        return [self.branch1x1(x), b7, self.branch7x7dbl_5(d), self.branch_pool(_avg_pool_3x3(x))]

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate(self.branches(x), axis=-1)


class InceptionD(nnx.Module):
    """17×17 → 8×8 reduction (``Mixed_7a``)."""

    def __init__(self, cin: int, *, conv: Any):
        self.branch3x3_1 = conv(cin, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(cin, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool(x, 2, "VALID")], axis=-1)


class InceptionE(nnx.Module):
    """8×8 block with split 3×3 convolutions (``Mixed_7b``: average pool; ``Mixed_7c``: max pool, FIDInceptionE_2)."""

    def __init__(self, cin: int, max_pool: bool, *, conv: Any):
        self.max_pool = max_pool
        self.branch1x1 = conv(cin, 320, 1)
        self.branch3x3_1 = conv(cin, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(cin, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _max_pool(x, 1, "SAME") if self.max_pool else _avg_pool_3x3(x)
        return jnp.concatenate(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(pooled),
            ],
            axis=-1,
        )


class InceptionV3(nnx.Module):
    """The FID InceptionV3 (module docstring): ``net(uint8 (N, H, W, 3))`` → ``{'pool', 'spatial', 'logits'}``.

    Attribute names follow torchvision's, so a pytorch-fid state dict maps onto it one name at a time
    (:meth:`from_pytorch_fid`). ``name`` identifies the weights in reference files.
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
        name: str = "",
        input_transform: str = "tf",
    ):
        check_input_transform(input_transform)
        conv = functools.partial(BasicConv, precision=precision, rngs=rngs)
        self.name = name or f"inception-v3-fid (random weights):{input_transform}"
        self.input_transform = input_transform
        self.precision = precision
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, conv=conv)
        self.Mixed_5c = InceptionA(256, 64, conv=conv)
        self.Mixed_5d = InceptionA(288, 64, conv=conv)
        self.Mixed_6a = InceptionB(288, conv=conv)
        self.Mixed_6b = InceptionC(768, 128, conv=conv)
        self.Mixed_6c = InceptionC(768, 160, conv=conv)
        self.Mixed_6d = InceptionC(768, 160, conv=conv)
        self.Mixed_6e = InceptionC(768, 192, conv=conv)
        self.Mixed_7a = InceptionD(768, conv=conv)
        self.Mixed_7b = InceptionE(1280, max_pool=False, conv=conv)
        self.Mixed_7c = InceptionE(2048, max_pool=True, conv=conv)
        self.fc_weight = nnx.Param(jax.random.normal(rngs.params(), (2048, NUM_LOGITS), jnp.float32) * 0.01)

    @property
    def resolution(self) -> tuple[int, int]:
        """The input size of the network proper; any image size is resized to it."""
        return (RESOLUTION, RESOLUTION)

    def preprocess(self, images: jax.Array) -> jax.Array:
        """uint8 (N, H, W, 3) → float32 (N, 299, 299, 3) in about [−1, 1], by the ``input_transform``'s resize and
        normalisation (module docstring); at 299 × 299 both resizes are the identity, exactly, and skipped."""
        tf = self.input_transform == "tf"
        x = images.astype(jnp.float32) if tf else images.astype(jnp.float32) / 255.0
        _, h, w, _ = x.shape
        if (h, w) != self.resolution:
            hi = jax.lax.Precision.HIGHEST
            x = jnp.einsum("oh,nhwc->nowc", resize_matrix(h, RESOLUTION, self.input_transform), x, precision=hi)
            x = jnp.einsum("pw,nowc->nopc", resize_matrix(w, RESOLUTION, self.input_transform), x, precision=hi)
        return (x - 128.0) * 0.0078125 if tf else 2.0 * x - 1.0

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """uint8 (N, H, W, 3) → ``{'pool', 'spatial', 'logits'}`` (module docstring): :meth:`preprocess`, then
        :meth:`features`."""
        check_images(images)
        return self.features(self.preprocess(images))

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """The network proper on preprocessed float32 (N, 299, 299, 3) input → ``{'pool', 'spatial', 'logits'}``."""
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = _max_pool(x, 2, "VALID")
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool(x, 2, "VALID")
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0][..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        x = jnp.concatenate(branches, axis=-1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = jnp.matmul(pool, self.fc_weight[...], precision=self.precision)
        return {"pool": pool, "spatial": spatial, "logits": logits}

    @classmethod
    def from_pytorch_fid(
        cls,
        path: str | os.PathLike | None = None,
        input_transform: str = "tf",
        precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
    ) -> InceptionV3:
        """The network with pytorch-fid's weights file (``pt_inception-2015-12-05-6726825d.pth``) at ``path``: a
        local or ``gs://`` path, or an ``http(s)://`` URL downloaded into the cache once (:mod:`gmflow_jax.cache`);
        None: ``PYTORCH_FID_URL``. ``input_transform``: ``"tf"`` or ``"pytorch-fid"`` (module docstring). Read without
        executing pickled code; a missing, unexpected or mis-shaped tensor is a ValueError naming it (both shapes).

        ``name`` is ``inception-v3-fid:<file name>:<input_transform>``: features of two transforms never mix."""
        from gmflow_jax.cache import local_copy
        from gmflow_jax.evaluate.torch_weights import load_state_dict

        check_input_transform(input_transform)
        path = local_copy(PYTORCH_FID_URL if path is None else path)
        name = f"inception-v3-fid:{os.path.basename(path)}:{input_transform}"
        net = nnx.eval_shape(
            lambda: cls(rngs=nnx.Rngs(0), precision=precision, name=name, input_transform=input_transform)
        )  # no random init
        load_pytorch_state(net, load_state_dict(path), path)
        return net


def check_images(images: Any) -> None:
    """ValueError naming the dtype or shape unless ``images`` is uint8 (N, H, W, 3)."""
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3) in [0, 255]; got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3); got {tuple(images.shape)}")


_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_IGNORED = ("num_batches_tracked", "fc.bias")  # a counter, and the bias the ADM evaluator's logits leave out


def _torch_to_nnx(key: str) -> tuple[tuple[str, ...], bool] | None:
    """A pytorch-fid key → (our state path, whether the tensor is a conv weight to transpose); None: not ours."""
    if key == "fc.weight":
        return ("fc_weight",), False
    parts = key.split(".")
    if len(parts) < 3 or parts[-2] not in ("conv", "bn"):
        return None
    *module, kind, leaf = parts
    if kind == "conv":
        return ((*module, "conv", "kernel"), True) if leaf == "weight" else None
    return ((*module, "bn", _BN_NAMES[leaf]), False) if leaf in _BN_NAMES else None


def load_pytorch_state(net: InceptionV3, state_dict: dict[str, np.ndarray], where: str) -> None:
    """Copies a pytorch-fid state dict into ``net`` in place (conv weights OIHW → HWIO, ``fc.weight`` transposed).

    ValueError naming every unexpected, mis-shaped (both shapes, PyTorch layout) or missing tensor (first three)."""
    targets = dict(nnx.to_flat_state(nnx.state(net)))
    problems, values = [], {}
    for key, value in state_dict.items():
        if key.endswith(_IGNORED):
            continue
        mapped = _torch_to_nnx(key)
        if mapped is None or mapped[0] not in targets:
            problems.append(f"unexpected tensor {key!r} {tuple(value.shape)}")
            continue
        path, is_conv = mapped
        want = tuple(targets[path].get_value().shape)
        torch_shape = (want[3], want[2], want[0], want[1]) if is_conv else want[::-1]
        if tuple(value.shape) != torch_shape:
            problems.append(f"{key!r} has shape {tuple(value.shape)}, expected {torch_shape}")
        array = np.asarray(value, np.float32)
        values[path] = array.transpose(2, 3, 1, 0) if is_conv else array.T
    missing = [path for path in targets if path not in values]
    problems += [f"missing tensor {torch_key(p)!r} {tuple(targets[p].get_value().shape)}" for p in missing]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{where}: not pytorch-fid's Inception weights: {'; '.join(problems[:3])}{more}")
    for path, array in values.items():
        targets[path].set_value(jnp.asarray(array))


def torch_key(path: tuple[str, ...]) -> str:
    """Our state path → the pytorch-fid key it is read from."""
    if path == ("fc_weight",):
        return "fc.weight"
    leaf = "weight" if path[-1] == "kernel" else {v: k for k, v in _BN_NAMES.items()}[path[-1]]
    return ".".join((*path[:-1], leaf))
