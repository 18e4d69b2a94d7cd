"""Stable Diffusion VAE (diffusers' ``AutoencoderKL``, e.g. ``stabilityai/sd-vae-ft-ema``) in Flax NNX.

Channel-last throughout: images ``(N, H, W, C)`` in ``[-1, 1]``, latents ``(N, H/f, W/f, latent_channels)``
with ``f = config.downsample_factor``. Parameters are float32; convolutions, projections and attention run
in the module's ``dtype``; GroupNorm statistics, the attention softmax and all outputs are float32.

``load_vae`` reads a diffusers folder (``config.json`` + safetensors weights); the jitted, batch-sharded entry
points ``encode`` / ``decode``, working on *scaled* latents (× ``config.scaling_factor``), are in
``gmflow_jax.models.vae_apply``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gmflow_jax.models.convert import read_diffusers_folder, to_numpy
from gmflow_jax.storage import workdir_path

Array = jax.Array

NORM_EPS = 1e-6  # every GroupNorm of the VAE
LOGVAR_RANGE = (-30.0, 20.0)  # posterior log-variance clip, as in diffusers
# diffusers config keys whose only supported value is fixed here
_FIXED_KEYS: dict[str, Any] = {
    "act_fn": "silu",
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an ``AutoencoderKL`` (the defaults are sd-vae-ft-ema's)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 256

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive int; got {value!r}.")
        bad = [c for c in self.block_out_channels if c < 1 or c % self.norm_num_groups]
        if not self.block_out_channels or bad:
            raise ValueError(
                f"VAEConfig.block_out_channels must be non-empty positive multiples of norm_num_groups="
                f"{self.norm_num_groups}; got {self.block_out_channels}."
            )
        if not self.scaling_factor > 0:
            raise ValueError(f"VAEConfig.scaling_factor must be positive; got {self.scaling_factor!r}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
        """From a diffusers ``config.json`` dict; unknown keys are ignored, unsupported values raise."""
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"VAE config _class_name must be 'AutoencoderKL'; got {d['_class_name']!r}.")
        for key, value in _FIXED_KEYS.items():
            if key in d and d[key] != value:
                raise ValueError(f"VAE config {key}={d[key]!r} is not supported; expected {value!r}.")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        size = kwargs.get("sample_size")
        if isinstance(size, list | tuple):
            if len(set(size)) != 1:
                raise ValueError(f"VAE config sample_size must be square; got {size!r}.")
            kwargs["sample_size"] = int(size[0])
        config = cls(**kwargs)
        n = len(config.block_out_channels)
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if key in d and list(d[key]) != [block] * n:
                raise ValueError(f"VAE config {key}={d[key]!r} is not supported; expected {n} x {block!r}.")
        return config

    def to_dict(self) -> dict[str, Any]:
        """A diffusers-compatible ``AutoencoderKL`` config dict (JSON-serialisable)."""
        n = len(self.block_out_channels)
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            **d,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            **_FIXED_KEYS,
        }

    @property
    def downsample_factor(self) -> int:
        """Spatial factor between images and latents, ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)


# --- layers ---------------------------------------------------------------------------


class GroupNorm(nnx.Module):
    """GroupNorm over (H, W, channels of a group) of ``(N, H, W, C)``; statistics in float32."""

    def __init__(self, channels: int, groups: int, *, dtype: jnp.dtype):
        self.groups, self.dtype = groups, dtype
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        n, h, w, c = x.shape
        xg = x.astype(jnp.float32).reshape(n, h * w, self.groups, c // self.groups)
        mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + NORM_EPS)).reshape(x.shape)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def _conv(
    cin: int, cout: int, kernel: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, stride: int = 1, padding: Any = "SAME"
) -> nnx.Conv:
    """Conv with float32 params, kernel (k, k, cin, cout); ``padding`` as for ``nnx.Conv``."""
    return nnx.Conv(
        cin, cout, (kernel, kernel), strides=stride, padding=padding, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
    )


class ResnetBlock(nnx.Module):
    """GroupNorm-SiLU-conv3×3 twice plus a (1×1-projected when C changes) skip: (N, H, W, cin) -> (.., cout)."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, groups, dtype=dtype)
        self.conv1 = _conv(cin, cout, 3, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(cout, groups, dtype=dtype)
        self.conv2 = _conv(cout, cout, 3, dtype=dtype, rngs=rngs)
        self.shortcut = _conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x: Array) -> Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.shortcut is None else self.shortcut(x))


class Attention(nnx.Module):
    """Single-head self-attention over all H·W pixels with a GroupNorm in front and a residual."""

    def __init__(self, channels: int, groups: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        def linear():
            return nnx.Linear(channels, channels, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

        self.dtype = dtype
        self.norm = GroupNorm(channels, groups, dtype=dtype)
        self.query, self.key, self.value, self.out = linear(), linear(), linear(), linear()

    def __call__(self, x: Array) -> Array:
        n, h, w, c = x.shape
        t = self.norm(x).reshape(n, h * w, c)
        q, k, v = self.query(t), self.key(t), self.value(t)
        logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        return x + self.out(jnp.einsum("nqk,nkc->nqc", probs, v)).reshape(x.shape)


class MidBlock(nnx.Module):
    """ResNet -> attention -> ResNet at constant width."""

    def __init__(self, channels: int, groups: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attention = Attention(channels, groups, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.resnets[1](self.attention(self.resnets[0](x)))


class DownBlock(nnx.Module):
    """ResNets, then (unless last) a stride-2 conv3×3 with padding (0, 1) on H and W: H -> H/2."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, down: bool, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List(
            [ResnetBlock(cin if i == 0 else cout, cout, groups, dtype=dtype, rngs=rngs) for i in range(layers)]
        )
        self.downsample = (
            _conv(cout, cout, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs) if down else None
        )

    def __call__(self, x: Array) -> Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
    """ResNets, then (unless last) nearest 2× upsampling and a conv3×3: H -> 2H."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, up: bool, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List(
            [ResnetBlock(cin if i == 0 else cout, cout, groups, dtype=dtype, rngs=rngs) for i in range(layers)]
        )
        self.upsample = _conv(cout, cout, 3, dtype=dtype, rngs=rngs) if up else None

    def __call__(self, x: Array) -> Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is None:
            return x
        return self.upsample(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Encoder(nnx.Module):
    """(N, H, W, in_channels) -> (N, H/f, W/f, 2·latent_channels) (mean and log-variance, pre quant_conv)."""

    def __init__(self, config: VAEConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        ch, g = config.block_out_channels, config.norm_num_groups
        self.conv_in = _conv(config.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                DownBlock(ch[max(i - 1, 0)], c, config.layers_per_block, g, i < len(ch) - 1, dtype=dtype, rngs=rngs)
                for i, c in enumerate(ch)
            ]
        )
        self.mid_block = MidBlock(ch[-1], g, dtype=dtype, rngs=rngs)
        self.norm_out = GroupNorm(ch[-1], g, dtype=dtype)
        self.conv_out = _conv(ch[-1], 2 * config.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    """(N, h, w, latent_channels) -> (N, h·f, w·f, out_channels)."""

    def __init__(self, config: VAEConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        ch, g = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = _conv(config.latent_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(ch[0], g, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List(
            [
                UpBlock(ch[max(i - 1, 0)], c, config.layers_per_block + 1, g, i < len(ch) - 1, dtype=dtype, rngs=rngs)
                for i, c in enumerate(ch)
            ]
        )
        self.norm_out = GroupNorm(ch[-1], g, dtype=dtype)
        self.conv_out = _conv(ch[-1], config.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: Array) -> Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The KL autoencoder: ``encode_moments`` (images -> posterior) and ``decode_latents`` (latents -> images)."""

    def __init__(self, config: VAEConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config, self.dtype = config, dtype
        lat = config.latent_channels
        self.encoder = Encoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = _conv(2 * lat, 2 * lat, 1, dtype=dtype, rngs=rngs)
        self.post_quant_conv = _conv(lat, lat, 1, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)

    def encode_moments(self, x: Array) -> tuple[Array, Array]:
        """x (N, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (N, H/f, W/f, latent_channels), float32.

        ``logvar`` is clipped to [-30, 20]; H and W must be multiples of f.
        """
        moments = self.quant_conv(self.encoder(x.astype(self.dtype))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode_latents(self, z: Array) -> Array:
        """Unscaled latents (N, h, w, latent_channels) -> images (N, h·f, w·f, out_channels), float32, ~[-1, 1]."""
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)


# --- diffusers state dicts ------------------------------------------------------------


class _Reader:
    """Takes named tensors from a diffusers state dict, checking their shapes and recording use."""

    def __init__(self, state_dict: Mapping[str, Any]):
        self.arrays = dict(state_dict)
        self.used: set[str] = set()

    def get(self, name: str, shape: tuple[int, ...], *, alt_shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self.arrays:
            raise ValueError(f"VAE state dict has no tensor {name!r} (expected shape {shape}).")
        value = to_numpy(self.arrays[name])
        if value.shape not in (shape, alt_shape):
            raise ValueError(f"VAE tensor {name!r} has shape {value.shape}; the config expects {shape}.")
        self.used.add(name)
        return value.reshape(shape)

    def name(self, new: str, old: str) -> str:
        """Layer ``new`` if it has a weight, else the legacy ``old`` if it has one (else ``new``, for the message)."""
        return old if f"{new}.weight" not in self.arrays and f"{old}.weight" in self.arrays else new

    def conv(self, name: str, cin: int, cout: int, k: int) -> dict[str, np.ndarray]:
        w = self.get(f"{name}.weight", (cout, cin, k, k))  # torch (out, in, kh, kw) -> (kh, kw, in, out)
        return {"kernel": w.transpose(2, 3, 1, 0), "bias": self.get(f"{name}.bias", (cout,))}

    def linear(self, name: str, c: int) -> dict[str, np.ndarray]:
        w = self.get(f"{name}.weight", (c, c), alt_shape=(c, c, 1, 1))  # legacy blocks stored 1×1 convs
        return {"kernel": w.T, "bias": self.get(f"{name}.bias", (c,))}

    def norm(self, name: str, c: int) -> dict[str, np.ndarray]:
        return {"scale": self.get(f"{name}.weight", (c,)), "bias": self.get(f"{name}.bias", (c,))}

    def resnet(self, name: str, cin: int, cout: int) -> dict[str, Any]:
        out = {
            "norm1": self.norm(f"{name}.norm1", cin),
            "conv1": self.conv(f"{name}.conv1", cin, cout, 3),
            "norm2": self.norm(f"{name}.norm2", cout),
            "conv2": self.conv(f"{name}.conv2", cout, cout, 3),
        }
        if cin != cout:
            out["shortcut"] = self.conv(f"{name}.conv_shortcut", cin, cout, 1)
        return out

    def mid(self, name: str, c: int) -> dict[str, Any]:
        a = f"{name}.attentions.0"
        return {
            "resnets": {i: self.resnet(f"{name}.resnets.{i}", c, c) for i in range(2)},
            "attention": {
                "norm": self.norm(f"{a}.group_norm", c),
                "query": self.linear(self.name(f"{a}.to_q", f"{a}.query"), c),
                "key": self.linear(self.name(f"{a}.to_k", f"{a}.key"), c),
                "value": self.linear(self.name(f"{a}.to_v", f"{a}.value"), c),
                "out": self.linear(self.name(f"{a}.to_out.0", f"{a}.proj_attn"), c),
            },
        }


def convert_vae_state_dict(state_dict: Mapping[str, Any], config: VAEConfig) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` state dict (torch tensors or arrays) -> ``nnx.to_pure_dict``-style float32 params.

    Accepts the current attention names (``to_q/to_k/to_v/to_out.0``) and the legacy ones
    (``query/key/value/proj_attn``, 2-D or 1×1-conv 4-D weights). A missing tensor, a shape mismatch
    or an unused tensor raises ValueError naming it.
    """
    r = _Reader(state_dict)
    ch, lat, layers = config.block_out_channels, config.latent_channels, config.layers_per_block

    def blocks(prefix: str, widths: tuple[int, ...], n_layers: int, resample: str, kind: str) -> dict[int, Any]:
        out = {}
        for i, c in enumerate(widths):
            cin = widths[max(i - 1, 0)]
            b = {
                "resnets": {j: r.resnet(f"{prefix}.{i}.resnets.{j}", cin if j == 0 else c, c) for j in range(n_layers)}
            }
            if i < len(widths) - 1:
                b[kind] = r.conv(f"{prefix}.{i}.{resample}.0.conv", c, c, 3)
            out[i] = b
        return out

    rev = ch[::-1]
    params = {
        "encoder": {
            "conv_in": r.conv("encoder.conv_in", config.in_channels, ch[0], 3),
            "down_blocks": blocks("encoder.down_blocks", ch, layers, "downsamplers", "downsample"),
            "mid_block": r.mid("encoder.mid_block", ch[-1]),
            "norm_out": r.norm("encoder.conv_norm_out", ch[-1]),
            "conv_out": r.conv("encoder.conv_out", ch[-1], 2 * lat, 3),
        },
        "quant_conv": r.conv("quant_conv", 2 * lat, 2 * lat, 1),
        "post_quant_conv": r.conv("post_quant_conv", lat, lat, 1),
        "decoder": {
            "conv_in": r.conv("decoder.conv_in", lat, rev[0], 3),
            "mid_block": r.mid("decoder.mid_block", rev[0]),
            "up_blocks": blocks("decoder.up_blocks", rev, layers + 1, "upsamplers", "upsample"),
            "norm_out": r.norm("decoder.conv_norm_out", rev[-1]),
            "conv_out": r.conv("decoder.conv_out", rev[-1], config.out_channels, 3),
        },
    }
    unused = sorted(set(r.arrays) - r.used)
    if unused:
        raise ValueError(f"VAE state dict has {len(unused)} tensor(s) the config does not use: {unused[:5]}.")
    return params


def vae_folder(folder: str, workdir: str | os.PathLike | None) -> str:
    """``config.model.vae`` as a path: a URL (``gs://``) or an absolute local path as it is (``~`` expanded), a
    relative path against the run's ``workdir`` (local or ``gs://``; the current directory when None)."""
    folder = os.path.expanduser(folder)
    if "://" in folder or os.path.isabs(folder):
        return str(workdir_path(folder))
    return str(workdir_path(workdir if workdir is not None else os.getcwd()) / folder)


def load_vae(folder: str, *, dtype: jnp.dtype = jnp.float32) -> AutoencoderKL:
    """A diffusers ``AutoencoderKL`` folder (config.json + safetensors weights; local, ``file://`` or ``gs://``) ->
    ``AutoencoderKL``."""
    raw, state_dict = read_diffusers_folder(folder)
    try:
        config = VAEConfig.from_dict(raw)
    except TypeError as e:
        raise ValueError(f"VAE config in {folder} is not a valid AutoencoderKL config: {e}") from None
    params = convert_vae_state_dict(state_dict, config)
    vae = nnx.eval_shape(lambda: AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)))
    state = nnx.state(vae, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(vae, state)
    return vae
