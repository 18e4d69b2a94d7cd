"""GM-DiT: a DiT trunk whose head predicts a Gaussian mixture over the velocity u (method.md §8).

Channel-last throughout: ``x (N, H, W, C)``, ``tau (N,)`` (= 1000·t), ``labels (N,)`` int in
``[0, num_classes]`` (``num_classes`` is the null class) -> ``GM(means (N, H, W, K, C),
logweights (N, H, W, K), logstds (N, 1, 1, 1, 1))`` in float32.

The authors' GM-DiT V2 (pi-Flow's student class, ``GMDiTTransformer2DModelV2``) computes the same
function as V1 with its head split into a means and a logits projection (merged into ``head`` by
``models.convert``) and the logstd MLP renamed; its students of the REPA teacher see the time as σ
rather than 1000σ, which ``time_scale`` covers (docs/method.md §10.8).

``remat`` chooses what the backward pass keeps of each block and what it recomputes
(``REMAT_POLICIES``): nothing but the block's inputs ('full'), everything ('none'), or the outputs of
named matrix products (``checkpoint_name``: ``query``, ``key``, ``value``, ``context`` (the attention
of the heads), ``attn_out``, ``mlp_hidden`` (before the GELU), ``mlp_out``). The function computed,
and its gradients, are the same for every policy.

Every parameter is float32 and carries logical axis names (``out_sharding`` metadata, read
by ``nnx.get_partition_spec``); a trainer maps them to mesh axes with logical axis rules.
The names used are listed in ``LOGICAL_AXES``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from gmflow_jax.flow import TAU_SCALE
from gmflow_jax.gm import GM
from gmflow_jax.models import dense

Array = jax.Array

# name -> (hidden size, depth, heads), as in the DiT paper
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
TIME_FREQ_DIM = 256  # sinusoidal features of tau
BLOCK_NORM_EPS = 1e-6  # attention-branch and final LayerNorm
LOGICAL_AXES: dict[str, str] = {
    "embed": "hidden size D (residual stream)",
    "mlp": "inner width of an MLP or of an adaLN modulation (4D, 6D, 2D, logstd inner)",
    "heads": "attention heads × head dim (query/key/value projections)",
    "vocab": "rows of the class table (num_classes + 1)",
    "patch": "flattened patch p·p·C",
    "freq": "sinusoidal time features (256)",
    "out": "per-token head outputs p·p·K·(C+1), or the single logstd",
}


def _linear(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    dtype: jnp.dtype,
    eager_sharding: bool | None,
    rngs: nnx.Rngs,
    zero: bool = False,
    dot_general=None,
) -> nnx.Linear:
    """Linear with float32 params: xavier-uniform (or zero) kernel (in, out), zero bias; its product is
    ``dot_general`` (default ``dense.dot_general``: autodiff's everywhere but in the CPU's backward pass)."""
    kernel_init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
    return nnx.Linear(
        in_features,
        out_features,
        dtype=dtype,
        param_dtype=jnp.float32,
        dot_general=dense.dot_general if dot_general is None else dot_general,
        kernel_init=nnx.with_partitioning(kernel_init, axes, eager_sharding=eager_sharding),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:], eager_sharding=eager_sharding),
        rngs=rngs,
    )


def layer_norm(x: Array, eps: float) -> Array:
    """LayerNorm over the last axis without affine parameters, computed in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    """x (N, T, D) with per-sample shift, scale (N, D)."""
    return x * (1.0 + scale[:, None]) + shift[:, None]


def timestep_features(tau: Array, dim: int = TIME_FREQ_DIM, freq_shift: float = 0.0, max_period: float = 1e4) -> Array:
    """Sinusoidal features of tau (N,) -> (N, dim), cosines first.

    Frequencies ``exp(−log(max_period)·i / (dim/2 − freq_shift))``, ``i < dim/2``: shift 0 is
    the original DiT (and the released GMFlow model), shift 1 is diffusers' stock DiT.
    """
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / (half - freq_shift))
    args = jnp.asarray(tau, jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


@functools.lru_cache(maxsize=32)
def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (grid_h·grid_w, dim), float32, tokens row-major.

    As in DiT/MAE, the first half of the features encodes the column index and the second
    half the row index, each as ``[sin(pos·ω), cos(pos·ω)]`` with ``ω_i = 10000^(−i/(dim/4))``.
    """
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def patchify(x: Array, p: int) -> Array:
    """(N, H, W, C) -> (N, H/p·W/p, p·p·C), tokens row-major, patch features ordered (i, j, c)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: Array, p: int, h: int, w: int) -> Array:
    """(N, H/p·W/p, p·p·Co) -> (N, H, W, Co); offset (i, j) of token (r, s) is pixel (r·p+i, s·p+j)."""
    n, _, f = x.shape
    co = f // (p * p)
    x = x.reshape(n, h // p, w // p, p, p, co).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h, w, co)


@jax.custom_vjp
def residual_barrier(x: Array) -> Array:
    """Identity on the residual stream whose backward pass makes XLA materialise the cotangent.

    Without it, the cotangent of the residual stream is a chain of elementwise adds (one per
    block and branch) that XLA:CPU's fusion pass copies into each of its consumers instead of
    computing it once, so every block's backward recomputes all later blocks' contributions:
    quadratic in depth (docs/performance.md). The backward returns ``g · exp(0 · g)``, which is
    ``g`` exactly for finite ``g``; XLA does not duplicate an ``exp`` into several consumers, so
    the cotangent is computed once per residual add. The forward compiles to the same program.
    """
    return x


def _barrier_fwd(x: Array) -> tuple[Array, None]:
    return x, None


def _barrier_bwd(_: None, g: Array) -> tuple[Array]:
    return (g * jnp.exp(0.0 * g),)


residual_barrier.defvjp(_barrier_fwd, _barrier_bwd)


class Attention(nnx.Module):
    """Multi-head self-attention with biased q, k, v and output projections: (N, T, D) -> (N, T, D)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        implementation: str | None,
        dtype: jnp.dtype,
        eager_sharding: bool | None,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, eager_sharding=eager_sharding, rngs=rngs)
        self.num_heads = num_heads
        self.implementation = implementation
        self.query = _linear(dim, dim, ("embed", "heads"), **kw)
        self.key = _linear(dim, dim, ("embed", "heads"), **kw)
        self.value = _linear(dim, dim, ("embed", "heads"), **kw)
        self.out = _linear(dim, dim, ("heads", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        n, t, d = x.shape

        def heads(y: Array) -> Array:
            return y.reshape(n, t, self.num_heads, d // self.num_heads)

        q = heads(checkpoint_name(self.query(x), "query"))
        k = heads(checkpoint_name(self.key(x), "key"))
        v = heads(checkpoint_name(self.value(x), "value"))
        o = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        o = checkpoint_name(o.reshape(n, t, d), "context")
        return checkpoint_name(self.out(o), "attn_out")


class DiTBlock(nnx.Module):
    """adaLN-Zero transformer block: x (N, T, D) float32, c (N, D) -> (N, T, D) float32."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float,
        mlp_norm_eps: float,
        attention_impl: str | None,
        dtype: jnp.dtype,
        eager_sharding: bool | None,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, eager_sharding=eager_sharding, rngs=rngs)
        hidden = int(dim * mlp_ratio)
        self.mlp_norm_eps = mlp_norm_eps
        self.adaln = _linear(dim, 6 * dim, ("embed", "mlp"), zero=True, **kw)
        self.attn = Attention(dim, num_heads, implementation=attention_impl, **kw)
        self.fc1 = _linear(dim, hidden, ("embed", "mlp"), **kw)
        # fc2's input is the GELU, which XLA:CPU would recompute inside dense.dot_general's transpose at more
        # cost than the faster product saves (docs/performance.md §10): autodiff's backward
        self.fc2 = _linear(hidden, dim, ("mlp", "embed"), dot_general=jax.lax.dot_general, **kw)

    def __call__(self, x: Array, c: Array) -> Array:
        mod = self.adaln(nnx.silu(c)).astype(jnp.float32)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = _modulate(layer_norm(x, BLOCK_NORM_EPS), shift_msa, scale_msa)
        x = residual_barrier(x + gate_msa[:, None] * self.attn(h))
        h = _modulate(layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp)
        h = checkpoint_name(self.fc1(h), "mlp_hidden")
        h = checkpoint_name(self.fc2(jax.nn.gelu(h, approximate=True)), "mlp_out")
        return residual_barrier(x + gate_mlp[:, None] * h)


def _apply_block(block: DiTBlock, x: Array, c: Array) -> Array:
    return block(x, c)


# remat policy -> the block's tensors the backward pass keeps (named above), as in maxtext's policies of
# the same names; 'matmul_without_batch' keeps every weight matmul's output by JAX's own policy.
_SAVED_NAMES: dict[str, tuple[str, ...]] = {
    "save_qkv_proj": ("query", "key", "value"),
    "save_dot_except_mlp": ("query", "key", "value", "attn_out"),
    "minimal": ("query", "key", "value", "attn_out", "mlp_hidden", "mlp_out"),
    "minimal_with_context": ("query", "key", "value", "context", "attn_out", "mlp_hidden", "mlp_out"),
}
REMAT_POLICIES = ("none", "full", *_SAVED_NAMES, "matmul_without_batch")


def remat_policy_name(remat: bool | str) -> str:
    """``True`` -> 'full', ``False`` -> 'none', a name of ``REMAT_POLICIES`` as it is; ``ValueError`` otherwise."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {REMAT_POLICIES} (or a bool); got {remat!r}.")
    return remat


@functools.cache
def _block_function(policy: str):
    """``_apply_block`` rematerialised by ``policy`` (a name of ``REMAT_POLICIES``)."""
    if policy == "none":
        return _apply_block
    if policy == "full":
        return nnx.remat(_apply_block)
    if policy == "matmul_without_batch":
        return nnx.remat(_apply_block, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return nnx.remat(_apply_block, policy=jax.checkpoint_policies.save_only_these_names(*_SAVED_NAMES[policy]))


class GMDiT(nnx.Module):
    """DiT trunk with a GM head over the velocity u (method.md §8); see the module docstring for I/O."""

    def __init__(
        self,
        *,
        input_size: int | Sequence[int] = 32,
        in_channels: int = 4,
        num_gaussians: int = 8,
        num_classes: int = 1000,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        freq_shift: float = 0.0,
        mlp_norm_eps: float = 1e-5,
        logstd_inner_dim: int = 1024,
        time_scale: float = TAU_SCALE,
        dtype: jnp.dtype | str = jnp.float32,
        remat: bool | str = False,
        attention_impl: str | None = None,
        eager_sharding: bool | None = False,
        rngs: nnx.Rngs,
    ):
        """Builds the network; parameters are float32, ``dtype`` is the compute dtype.

        ``freq_shift``: 0 for the released model / original DiT, 1 for diffusers' stock DiT.
        ``mlp_norm_eps``: eps of the MLP-branch LayerNorm (diffusers' ``norm_eps``, 1e-5;
        the original DiT uses 1e-6). ``time_scale``: the network embeds the time ``σ · time_scale``,
        i.e. ``tau · time_scale / 1000``: 1000 (GMFlow, DiT) takes ``tau`` as it is; the authors' pi-Flow
        students of the REPA teacher were trained with 1 (their ``num_timesteps``). ``remat``: a name of
        ``REMAT_POLICIES`` (what the backward pass keeps of each block), True for 'full', False for 'none'.
        ``attention_impl`` goes to ``jax.nn.dot_product_attention`` (None: XLA; 'cudnn' on GPUs).
        ``eager_sharding``: False stores the logical axis names as metadata only (no mesh needed); None
        follows ``nnx.use_eager_sharding``.
        """
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        p = patch_size
        if p < 1 or h % p or w % p:
            raise ValueError(f"input_size {(h, w)} must be divisible by patch_size {p}.")
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(
                f"hidden_size {hidden_size} must be divisible by num_heads {num_heads} and by 4 (position embedding)."
            )
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0; got {time_scale}.")
        if not 0 <= freq_shift < TIME_FREQ_DIM // 2:
            raise ValueError(f"freq_shift must lie in [0, {TIME_FREQ_DIM // 2}); got {freq_shift}.")
        if min(in_channels, num_gaussians, num_classes, depth) < 1:
            raise ValueError(
                f"in_channels, num_gaussians, num_classes and depth must be positive; got "
                f"{in_channels}, {num_gaussians}, {num_classes}, {depth}."
            )
        dtype = jnp.dtype(dtype)
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"compute dtype must be float32 or bfloat16; got {dtype}.")
        self.input_size = (h, w)
        self.in_channels = in_channels
        self.num_gaussians = num_gaussians
        self.num_classes = num_classes
        self.patch_size = p
        self.hidden_size = hidden_size
        self.freq_shift = float(freq_shift)
        self.time_scale = float(time_scale)
        self.remat = remat_policy_name(remat)
        self.dtype = dtype
        kw = dict(dtype=dtype, eager_sharding=eager_sharding, rngs=rngs)
        d = hidden_size

        self.patch_embed = _linear(p * p * in_channels, d, ("patch", "embed"), **kw)
        self.time_fc1 = _linear(TIME_FREQ_DIM, d, ("freq", "mlp"), **kw)
        self.time_fc2 = _linear(d, d, ("mlp", "embed"), **kw)
        self.class_embed = nnx.Embed(
            num_classes + 1,
            d,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=nnx.with_partitioning(
                nnx.initializers.normal(0.02), ("vocab", "embed"), eager_sharding=eager_sharding
            ),
            rngs=rngs,
        )
        self.blocks = nnx.List(
            [
                DiTBlock(
                    d, num_heads, mlp_ratio=mlp_ratio, mlp_norm_eps=mlp_norm_eps, attention_impl=attention_impl, **kw
                )
                for _ in range(depth)
            ]
        )
        self.final_adaln = _linear(d, 2 * d, ("embed", "mlp"), zero=True, **kw)
        self.head = _linear(d, p * p * num_gaussians * (in_channels + 1), ("embed", "out"), **kw)
        self.logstd_fc1 = _linear(d, logstd_inner_dim, ("embed", "mlp"), **kw)
        self.logstd_fc2 = _linear(logstd_inner_dim, 1, ("mlp", "out"), zero=True, **kw)

    @classmethod
    def from_name(cls, name: str = "XL/2", **kwargs) -> GMDiT:
        """Builds a standard size, ``'S/2'``, ``'B/4'``, ``'L/8'``, ``'XL/2'``, ...; other kwargs pass through."""
        m = re.fullmatch(r"(S|B|L|XL)/(\d+)", name)
        if m is None:
            raise ValueError(f"model name must look like 'XL/2' with size in {sorted(DIT_SIZES)}; got {name!r}.")
        hidden, depth, heads = DIT_SIZES[m.group(1)]
        return cls(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=int(m.group(2)), **kwargs)

    def _check_inputs(self, x: Array, tau: Array, labels: Array) -> tuple[Array, Array, Array]:
        x, tau, labels = jnp.asarray(x), jnp.asarray(tau), jnp.asarray(labels)
        expected = self.input_size + (self.in_channels,)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, expected))}); got {x.shape}.")
        n = x.shape[0]
        if tau.shape != (n,):
            raise ValueError(f"tau must have shape (N,) = ({n},); got {tau.shape}.")
        if labels.shape != (n,) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"labels must be integers of shape (N,) = ({n},); got {labels.dtype} {labels.shape}.")
        return x, tau, labels

    def conditioning(self, tau: Array, labels: Array) -> Array:
        """c = time embedding + class embedding: tau (N,), labels (N,) -> (N, D) in the compute dtype."""
        if self.time_scale != TAU_SCALE:
            tau = jnp.asarray(tau, jnp.float32) * (self.time_scale / TAU_SCALE)
        t = timestep_features(tau, TIME_FREQ_DIM, self.freq_shift)
        t = self.time_fc2(nnx.silu(self.time_fc1(t)))
        return t + self.class_embed(labels)

    def _forward(self, x: Array, tau: Array, labels: Array) -> tuple[Array, Array]:
        """Raw head output (N, H, W, K·(C+1)) float32 and the conditioning c (N, D)."""
        x, tau, labels = self._check_inputs(x, tau, labels)
        _, h, w, _ = x.shape
        p = self.patch_size
        c = self.conditioning(tau, labels)
        tokens = self.patch_embed(patchify(x, p)).astype(jnp.float32)
        tokens = tokens + jnp.asarray(sincos_pos_embed(self.hidden_size, h // p, w // p))[None]
        apply = _block_function(self.remat)
        for block in self.blocks:
            tokens = apply(block, tokens, c)
        shift, scale = jnp.split(self.final_adaln(nnx.silu(c)).astype(jnp.float32), 2, axis=-1)
        out = self.head(_modulate(layer_norm(tokens, BLOCK_NORM_EPS), shift, scale))
        return unpatchify(out.astype(jnp.float32), p, h, w), c

    def raw_output(self, x: Array, tau: Array, labels: Array) -> Array:
        """Unpatchified head output before the GM split: (N, H, W, K·(C+1)) float32.

        Channels ``[kC, (k+1)C)`` are the means of component k, the last K are logits.
        """
        return self._forward(x, tau, labels)[0]

    def __call__(self, x: Array, tau: Array, labels: Array) -> GM:
        """u-GM at (x (N, H, W, C), tau (N,), labels (N,)): means (N,H,W,K,C), logweights (N,H,W,K),
        logstds (N,1,1,1,1), all float32."""
        raw, c = self._forward(x, tau, labels)
        n, h, w, _ = raw.shape
        k, ch = self.num_gaussians, self.in_channels
        means = raw[..., : k * ch].reshape(n, h, w, k, ch)
        logweights = jax.nn.log_softmax(raw[..., k * ch :], axis=-1)
        logstds = self.logstd_fc2(nnx.silu(self.logstd_fc1(nnx.silu(jax.lax.stop_gradient(c)))))
        return GM(means, logweights, logstds.astype(jnp.float32).reshape(n, 1, 1, 1, 1))
