"""Builds the trained network from ``config.model``: a denoiser ``net`` and an optional SpectrumMLP.

``config.model.kind``:

* ``'gmdit'``: ``GMDiT`` on images ``(N, H, W, C)``; ``arch`` a standard size (``'XL/2'``) or ``''``
  for explicit ``hidden_size / depth / num_heads / patch_size``; ``spectrum=True`` adds a
  ``SpectrumMLP`` trained jointly (docs/method.md §4–5).
* ``'toy'``: ``ToyGMFlow`` on 2-D points ``(N, 2)``; ``num_gaussians=1, learn_std=False`` is the
  flow-matching baseline.

``time_scale`` (``'gmdit'``; 1000 where a config predates it): the network embeds σ · time_scale
(``GMDiT``): 1000 for GMFlow and DiT, 1 for the authors' pi-Flow students of the REPA teacher.

Both are held by ``GMFlowModel`` so that one parameter tree ``{'net': ..., 'spectrum': ...}`` is
trained, averaged (EMA) and checkpointed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gmflow_jax.flow import TAU_SCALE
from gmflow_jax.models.gmdit import REMAT_POLICIES, GMDiT
from gmflow_jax.models.spectrum import SpectrumMLP
from gmflow_jax.models.toy import ToyGMFlow

MODEL_KINDS = ("gmdit", "toy")


class GMFlowModel(nnx.Module):
    """Container: ``net(x_t, tau, labels) -> GM over u`` and ``spectrum`` (a SpectrumMLP or None)."""

    def __init__(self, net: nnx.Module, spectrum: SpectrumMLP | None = None):
        self.net = net
        self.spectrum = spectrum


def data_shape(mcfg: Any) -> tuple[int, ...]:
    """Shape of one training example the model expects: (H, W, C) images or (C,) points."""
    if mcfg.kind == "toy":
        return (int(mcfg.channels),)
    h, w = (mcfg.input_size, mcfg.input_size) if isinstance(mcfg.input_size, int) else tuple(mcfg.input_size)
    return (int(h), int(w), int(mcfg.in_channels))


def remat_policy(mcfg: Any) -> str:
    """The GM-DiT's remat policy (``gmdit.REMAT_POLICIES``: what the backward pass keeps of each block):
    ``config.model.remat_policy`` or, where that is
    ``''`` (or absent, as in the saved configs of older runs), the older bool ``remat``: True -> 'full'."""
    return mcfg.get("remat_policy", "") or ("full" if mcfg.get("remat", False) else "none")


def check_remat_policy(mcfg: Any) -> None:
    """``ValueError`` unless ``remat_policy`` is ``''`` or a name of ``REMAT_POLICIES`` and agrees with ``remat``."""
    policy = mcfg.get("remat_policy", "")
    if policy not in ("", *REMAT_POLICIES):
        raise ValueError(f"config.model.remat_policy must be one of {('', *REMAT_POLICIES)}; got {policy!r}.")
    if mcfg.get("remat", False) and policy not in ("", "full"):
        raise ValueError(
            f"config.model.remat must be False with model.remat_policy={policy!r} (remat=True is the older "
            "spelling of 'full'); got True."
        )


def build_model(mcfg: Any, rngs: nnx.Rngs, *, remat: bool | None = None) -> GMFlowModel:
    """The model described by ``config.model`` with parameters drawn from ``rngs``.

    ``remat`` overrides the config's remat policy (``remat_policy``; False: 'none', sampling builds
    without remat: no gradients, and nnx's remat does not nest in the sampler's vmapped sweeps); the
    parameters are the same either way.
    """
    if mcfg.kind == "toy":
        net = ToyGMFlow(
            num_components=mcfg.num_gaussians,
            channels=mcfg.channels,
            hidden=mcfg.hidden,
            num_layers=mcfg.num_layers,
            num_freqs=mcfg.num_freqs,
            learn_std=mcfg.learn_std,
            rngs=rngs,
        )
        return GMFlowModel(net, None)
    if mcfg.kind != "gmdit":
        raise ValueError(f"config.model.kind must be one of {MODEL_KINDS}; got {mcfg.kind!r}.")
    kw = dict(
        input_size=data_shape(mcfg)[:2],
        in_channels=mcfg.in_channels,
        num_gaussians=mcfg.num_gaussians,
        num_classes=mcfg.num_classes,
        mlp_ratio=mcfg.mlp_ratio,
        freq_shift=mcfg.freq_shift,
        logstd_inner_dim=mcfg.logstd_inner_dim,
        time_scale=float(mcfg.get("time_scale", TAU_SCALE)),
        dtype=jnp.dtype(mcfg.dtype),
        remat=remat_policy(mcfg) if remat is None else remat,
        rngs=rngs,
    )
    if mcfg.arch:
        net = GMDiT.from_name(mcfg.arch, **kw)
    else:
        net = GMDiT(
            patch_size=mcfg.patch_size, hidden_size=mcfg.hidden_size, depth=mcfg.depth, num_heads=mcfg.num_heads, **kw
        )
    spectrum = None
    if mcfg.spectrum:
        spectrum = SpectrumMLP(channels=mcfg.in_channels, base_size=tuple(mcfg.spectrum_base_size), rngs=rngs)
    return GMFlowModel(net, spectrum)


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, Param state)``; ``ValueError`` if the model holds other mutable state."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the model holds non-parameter state the trainer does not handle: {rest}")
    return graphdef, params
