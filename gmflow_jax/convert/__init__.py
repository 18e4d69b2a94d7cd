"""A published GMFlow pipeline folder -> a workdir that the ``Sampler`` and the trainer's ``init_from`` read.

    python -m gmflow_jax.convert --from DIR --workdir DIR

``DIR`` is a ``GMDiTPipeline`` folder as published (e.g. ``Lakonik/gmflow_imagenet_k8_ema``):
``model_index.json``, ``transformer/``, ``spectrum_net/``, ``vae/``, ``scheduler/``; each network a
diffusers folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` or a variant such as
``diffusion_pytorch_model.bf16.safetensors``. Parts are recognised by their config fields, not by
``_class_name`` (folders saved from the authors' code name private classes). The workdir gets:

* ``checkpoints/0/`` with ``params`` = ``ema`` = the published weights (float32) and the config
  (``meta``), plus its manifest: ``Sampler.from_checkpoint(workdir)`` and
  ``--config.init_from=workdir`` take it like any checkpoint of ours (it has no optimizer state, so
  training does not *resume* from it);
* ``config.json`` / ``config.yaml``: the ``imagenet_gmdit_k8`` recipe with the model read from the
  transformer's config, ``model.vae = 'vae'``;
* ``vae/``: a copy of the VAE folder (config and weights), which the Sampler decodes with.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gmflow_jax import checkpoint as ckpt_lib
from gmflow_jax.models.convert import (
    convert_gmdit_state_dict,
    convert_spectrum_state_dict,
    read_diffusers_folder,
    weights_file,
)
from gmflow_jax.models.factory import build_model, split_params

BASE_CONFIG = "imagenet_gmdit_k8"
TRANSFORMER_FIELDS = {"num_gaussians", "num_layers", "num_attention_heads", "attention_head_dim"}
SPECTRUM_FIELDS = {"base_size", "layers"}
VAE_FIELDS = {"latent_channels", "block_out_channels"}
# transformer config fields that must have these values (the architecture GM-DiT implements)
FIXED_FIELDS = {
    "gm_num_logstd_layers": 2,
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
    "upcast_attention": False,
    "norm_elementwise_affine": False,
}


def find_parts(src: str) -> dict[str, str]:
    """``{'transformer'|'spectrum'|'vae': folder}`` recognised by their config fields (local, ``file://`` or
    ``gs://``)."""
    root = ckpt_lib.workdir_path(src)
    if not root.is_dir():
        raise ValueError(f"--from {src!r} is not a folder; expected a published GMFlow pipeline folder.")
    parts: dict[str, str] = {}
    for name in sorted(p.name for p in root.iterdir()):
        config = root / name / "config.json"
        if not config.is_file():
            continue
        keys = set(json.loads(config.read_text()))
        for part, fields in (("transformer", TRANSFORMER_FIELDS), ("spectrum", SPECTRUM_FIELDS), ("vae", VAE_FIELDS)):
            if fields <= keys:
                if part in parts:
                    raise ValueError(f"{src} has two {part} folders: {parts[part]} and {name}.")
                parts[part] = str(root / name)
    if "transformer" not in parts:
        raise ValueError(
            f"{src} has no GM-DiT transformer folder (a subfolder whose config.json has {sorted(TRANSFORMER_FIELDS)}); "
            "expected a published GMFlow pipeline folder."
        )
    return parts


def model_config(transformer: dict[str, Any], spectrum: dict[str, Any] | None) -> ml_collections.ConfigDict:
    """The ``imagenet_gmdit_k8`` config with ``model`` read from the published configs; ValueError naming a
    field whose value GM-DiT does not implement."""
    from gmflow_jax.train.config import load_config

    for field, value in FIXED_FIELDS.items():
        if field in transformer and transformer[field] != value:
            raise ValueError(f"transformer config {field}={transformer[field]!r} is not supported; expected {value!r}.")
    config = load_config(BASE_CONFIG)
    m = config.model
    heads, head_dim = int(transformer["num_attention_heads"]), int(transformer["attention_head_dim"])
    m.arch = ""
    m.hidden_size, m.num_heads, m.depth = heads * head_dim, heads, int(transformer["num_layers"])
    m.patch_size = int(transformer.get("patch_size", 2))
    m.input_size = int(transformer.get("sample_size", 32))
    m.in_channels = int(transformer.get("in_channels", 4))
    m.num_gaussians = int(transformer["num_gaussians"])
    m.num_classes = int(transformer.get("num_embeds_ada_norm", 1000))
    m.logstd_inner_dim = int(transformer.get("logstd_inner_dim", 1024))
    m.freq_shift = 0.0  # GMFlow's time embedding (diffusers' stock DiT uses 1)
    m.spectrum = spectrum is not None
    if spectrum is not None:
        channels, *base = (int(v) for v in spectrum["base_size"])
        if channels != m.in_channels or list(spectrum["layers"]) != [64, 8]:
            raise ValueError(
                f"spectrum_net config base_size={spectrum['base_size']}, layers={spectrum['layers']} is not supported; "
                f"expected base_size [{m.in_channels}, H, W] and layers [64, 8]."
            )
        m.spectrum_base_size = tuple(base)
    return config


def convert_pipeline(src: str, workdir: str, *, dtype: str | None = None) -> str:
    """Converts the pipeline folder ``src`` into ``workdir`` (see the module docstring); returns the step
    directory. ``dtype``: the compute dtype written into the config (default: the recipe's)."""
    from gmflow_jax.train.config import write_config

    parts = find_parts(src)
    workdir = ckpt_lib.workdir_path(workdir)
    if ckpt_lib.list_steps(workdir / ckpt_lib.CHECKPOINT_DIR):
        raise ValueError(f"--workdir {workdir} already holds checkpoints; expected a new or empty folder.")
    t_config, t_state = read_diffusers_folder(parts["transformer"])
    s_config, s_state = read_diffusers_folder(parts["spectrum"]) if "spectrum" in parts else (None, None)
    config = model_config(t_config, s_config)
    if dtype is not None:
        config.model.dtype = dtype
    if "vae" in parts:
        config.model.vae = "vae"
    abstract = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
    graphdef, params = split_params(abstract)
    del graphdef
    pure = {"net": convert_gmdit_state_dict(t_state, abstract.net)}
    if s_state is not None:
        pure["spectrum"] = convert_spectrum_state_dict(s_state, abstract.spectrum)
    target = nnx.to_pure_dict(params)
    pure = jax.tree.map(lambda ref, v: jnp.asarray(v, ref.dtype), target, pure)
    workdir.mkdir(parents=True, exist_ok=True)
    if "vae" in parts:
        dest = workdir / "vae"
        dest.mkdir(parents=True, exist_ok=True)
        for path in (
            ckpt_lib.workdir_path(parts["vae"]) / "config.json",
            ckpt_lib.workdir_path(weights_file(parts["vae"])),
        ):
            ckpt_lib.copy_file(path, dest / path.name)
    writer = ckpt_lib.Checkpointer(workdir, keep=1, async_save=False)
    try:
        state = {"step": jnp.zeros([], jnp.int32), "params": pure, "ema": pure}
        meta = {
            "step": 0,
            "config": json.loads(config.to_json_best_effort()),
            "converted_from": str(ckpt_lib.workdir_path(src)),
        }
        writer.save(0, state, None, meta)
    finally:
        writer.close()
    write_config(config, workdir)
    return str(workdir / ckpt_lib.CHECKPOINT_DIR / "0")
