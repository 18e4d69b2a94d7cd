"""PyTorch (diffusers / GMFlow) state dicts -> GM-DiT and SpectrumMLP parameters.

Accepted GM-DiT layouts (names as in diffusers' ``DiTTransformer2DModel``):

* GMFlow's ``GMDiTTransformer2DModel`` (the published checkpoint): one shared conditioning
  embedding under ``emb.*``, ``proj_out_2`` emitting p·p·K·(C+1) per token and the logstd
  head under ``gm_out.logstd_layers.{1,3}``; its V2 variant (``GMDiTTransformer2DModelV2``, pi-Flow's
  students: ``proj_out_means`` p·p·K·C and ``proj_out_logweights`` p·p·K per token,
  ``proj_out_logstds.{1,3}``) computes the same function and is merged into the same layout.
* diffusers' stock DiT: a conditioning embedding per block
  (``transformer_blocks.{i}.norm1.emb.*``). GM-DiT shares one, so all copies must be
  equal (they are in checkpoints converted from the original DiT); block 0's is used.

Values may be torch tensors (any dtype, any device) or array-likes; torch is not imported.
Torch ``Linear.weight`` is (out, in); our kernels are (in, out).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from gmflow_jax.models.gmdit import GMDiT
from gmflow_jax.models.spectrum import SpectrumMLP
from gmflow_jax.storage import copy_file, is_url, workdir_path

WEIGHTS = "diffusion_pytorch_model"


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any dtype, any device) or an array-like -> float32 NumPy."""
    if hasattr(value, "detach"):  # torch.Tensor (bfloat16 has no NumPy dtype, hence .float())
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


@contextlib.contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[str]:
    """A local file name for ``path``: itself when local, else a temporary download (safetensors maps local files)."""
    if not is_url(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, workdir_path(path).name)
        copy_file(path, local)
        yield local


def weights_file(folder: str | os.PathLike) -> str:
    """The weights of a diffusers folder (local, ``file://`` or ``gs://``): ``diffusion_pytorch_model.safetensors``,
    else its one variant (``diffusion_pytorch_model.<variant>.safetensors``, e.g. ``bf16``); ValueError naming
    the folder."""
    folder = workdir_path(folder)
    plain = folder / f"{WEIGHTS}.safetensors"
    if plain.is_file():
        return str(plain)
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    variants = sorted(n for n in names if n.startswith(WEIGHTS + ".") and n.endswith(".safetensors"))
    if not variants:
        raise ValueError(f"{folder} has no {WEIGHTS}.safetensors (nor a {WEIGHTS}.<variant>.safetensors).")
    if len(variants) > 1:
        raise ValueError(f"{folder} has several weight variants {variants} and no {WEIGHTS}.safetensors; keep one.")
    return str(folder / variants[0])


def read_config(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``config.json`` of a model folder (None where it has none); ValueError for invalid JSON."""
    config_path = workdir_path(folder) / "config.json"
    if not config_path.is_file():
        return None
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None


def read_weights(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(state dict as float32 NumPy, safetensors metadata)`` of a model folder's weights (``weights_file``),
    bf16/fp16 upcast; ValueError naming the path for a missing or unreadable file."""
    from safetensors import safe_open

    weights = weights_file(folder)
    try:
        with local_copy(weights) as local, safe_open(local, framework="numpy") as f:
            state = {name: to_numpy(f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118
            metadata = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"weights {weights} could not be read: {e}") from None
    return state, metadata


def read_diffusers_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config.json, state dict as float32 NumPy)`` of a diffusers model folder, local, ``file://`` or ``gs://``
    (bf16/fp16 upcast); ValueError naming the path for a missing or unreadable file."""
    config = read_config(folder)
    if config is None:
        raise ValueError(f"{os.fspath(folder)!r} has no config.json; expected a diffusers model folder.")
    return config, read_weights(folder)[0]


class _Reader:
    """Pops named arrays from a state dict and remembers which names were used."""

    def __init__(self, state_dict: Mapping[str, Any], prefix: str):
        self.arrays = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.arrays

    def get(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise KeyError(f"state dict has no entry {name!r}.")
        self.used.add(name)
        return to_numpy(self.arrays[name])

    def linear(self, name: str) -> dict[str, np.ndarray]:
        return {"kernel": self.get(f"{name}.weight").T, "bias": self.get(f"{name}.bias")}

    def unused(self) -> list[str]:
        return sorted(set(self.arrays) - self.used)


def _conditioning(reader: _Reader, depth: int) -> dict[str, Any]:
    """Time MLP and class table, from ``emb.*`` or from the per-block copies of stock diffusers."""
    if reader.has("emb.timestep_embedder.linear_1.weight"):
        base = "emb"
    else:
        base = "transformer_blocks.0.norm1.emb"
        names = [k[len(base) :] for k in reader.arrays if k.startswith(base + ".")]
        for i in range(1, depth):
            for name in names:
                other = f"transformer_blocks.{i}.norm1.emb{name}"
                if not reader.has(other):
                    continue
                if not np.array_equal(reader.get(other), reader.get(base + name)):
                    raise ValueError(
                        f"{other} differs from {base + name}: GM-DiT shares one conditioning embedding across "
                        "blocks, so every block's copy must be equal."
                    )
    return {
        "time_fc1": reader.linear(f"{base}.timestep_embedder.linear_1"),
        "time_fc2": reader.linear(f"{base}.timestep_embedder.linear_2"),
        "class_embed": {"embedding": reader.get(f"{base}.class_embedder.embedding_table.weight")},
    }


def _head(reader: _Reader, patch: int) -> dict[str, np.ndarray]:
    """proj_out_2, or GMFlow V2's proj_out_means + proj_out_logweights merged per token."""
    if reader.has("proj_out_2.weight"):
        return reader.linear("proj_out_2")
    means, logits = reader.linear("proj_out_means"), reader.linear("proj_out_logweights")
    pp = patch * patch

    def merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # (..., pp·KC), (..., pp·K) -> (..., pp·K(C+1))
        a = a.reshape(a.shape[:-1] + (pp, -1))
        b = b.reshape(b.shape[:-1] + (pp, -1))
        out = np.concatenate([a, b], axis=-1)
        return out.reshape(out.shape[:-2] + (-1,))

    return {k: merge(means[k], logits[k]) for k in ("kernel", "bias")}


def convert_gmdit_state_dict(
    state_dict: Mapping[str, Any], model: GMDiT, *, prefix: str = "", strict: bool = True
) -> dict[str, Any]:
    """Torch state dict -> nested dict of float32 NumPy arrays shaped like ``model``'s params.

    ``model`` may be abstract (``nnx.eval_shape``): only its shapes are read. With
    ``strict``, every entry under ``prefix`` must be used and every parameter found; without
    it, a missing logstd head keeps the model's values and unknown entries are ignored.
    Raises KeyError / ValueError naming the offending entry.
    """
    reader = _Reader(state_dict, prefix)
    depth, p = len(model.blocks), model.patch_size
    params: dict[str, Any] = _conditioning(reader, depth)

    w = reader.get("pos_embed.proj.weight")  # (D, C, p, p) -> (p·p·C, D), features ordered (i, j, c)
    params["patch_embed"] = {
        "kernel": w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]),
        "bias": reader.get("pos_embed.proj.bias"),
    }
    blocks = {}
    for i in range(depth):
        b = f"transformer_blocks.{i}"
        blocks[i] = {
            "adaln": reader.linear(f"{b}.norm1.linear"),
            "attn": {
                "query": reader.linear(f"{b}.attn1.to_q"),
                "key": reader.linear(f"{b}.attn1.to_k"),
                "value": reader.linear(f"{b}.attn1.to_v"),
                "out": reader.linear(f"{b}.attn1.to_out.0"),
            },
            "fc1": reader.linear(f"{b}.ff.net.0.proj"),
            "fc2": reader.linear(f"{b}.ff.net.2"),
        }
    params["blocks"] = blocks
    params["final_adaln"] = reader.linear("proj_out_1")
    params["head"] = _head(reader, p)
    for base in ("gm_out.logstd_layers", "proj_out_logstds"):
        if reader.has(f"{base}.1.weight"):
            params["logstd_fc1"] = reader.linear(f"{base}.1")
            params["logstd_fc2"] = reader.linear(f"{base}.3")
            break
    if reader.has("pos_embed.pos_embed"):  # fixed buffer, recomputed by GM-DiT
        reader.get("pos_embed.pos_embed")
    return _match_params(params, nnx.to_pure_dict(nnx.state(model, nnx.Param)), reader, strict, "GM-DiT")


def _match_params(
    params: dict[str, Any], target: dict[str, Any], reader: _Reader, strict: bool, what: str
) -> dict[str, Any]:
    """Checks shapes against ``target`` (the model's pure param dict); fills gaps when not strict."""
    if strict and reader.unused():
        raise ValueError(f"{what} state dict has entries the model does not use: {reader.unused()[:10]}.")
    flat_target = dict(nnx.traversals.flatten_mapping(target))
    flat_params = dict(nnx.traversals.flatten_mapping(params))
    out = {}
    for path, ref in flat_target.items():
        name = "/".join(map(str, path))
        if path not in flat_params:
            if strict:
                raise KeyError(f"{what} parameter {name} has no entry in the state dict.")
            out[path] = np.asarray(ref, np.float32) if not isinstance(ref, jax.ShapeDtypeStruct) else ref
            continue
        value = flat_params[path]
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"{what} parameter {name}: state dict gives shape {value.shape}, model has {ref.shape}.")
        out[path] = value
    return nnx.traversals.unflatten_mapping(out)


def load_gmdit_state_dict(
    model: GMDiT, state_dict: Mapping[str, Any], *, prefix: str = "", strict: bool = True
) -> None:
    """Loads a torch state dict into ``model`` in place (see ``convert_gmdit_state_dict``)."""
    _load(model, convert_gmdit_state_dict(state_dict, model, prefix=prefix, strict=strict))


def convert_spectrum_state_dict(
    state_dict: Mapping[str, Any], model: SpectrumMLP, *, prefix: str = "", strict: bool = True
) -> dict[str, Any]:
    """GMFlow ``SpectrumMLP`` state dict (``mlp.{0,2,4}``) -> nested dict shaped like ``model``'s params."""
    reader = _Reader(state_dict, prefix)
    params = {"layers": {i: reader.linear(f"mlp.{2 * i}") for i in range(len(model.layers))}}
    return _match_params(params, nnx.to_pure_dict(nnx.state(model, nnx.Param)), reader, strict, "SpectrumMLP")


def load_spectrum_state_dict(
    model: SpectrumMLP, state_dict: Mapping[str, Any], *, prefix: str = "", strict: bool = True
) -> None:
    """Loads a GMFlow SpectrumMLP state dict into ``model`` in place."""
    _load(model, convert_spectrum_state_dict(state_dict, model, prefix=prefix, strict=strict))


def _load(model: nnx.Module, pure: dict[str, Any]) -> None:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jax.numpy.asarray(a, jax.numpy.float32), pure))
    nnx.update(model, state)
