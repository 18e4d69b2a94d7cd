"""A published GMFlow pipeline folder -> a workdir that the ``Sampler`` and the trainer's ``init_from`` read.

    python -m gmflow_jax.convert --from DIR --workdir DIR [--nfe N] [--time_scale S] [--vae DIR]

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

``DIR`` may instead be one of the authors' pi-Flow ImageNet students (``Lakonik/pi-Flow-ImageNet``, e.g.
``gmdit_k32_imagenet_piid_1step/``): a model folder holding GM-DiT **V2** weights
(``GMDiTTransformer2DModelV2``: ``proj_out_means``, ``proj_out_logweights``, ``proj_out_logstds``) in
``diffusion_pytorch_model.safetensors``, with the ``config.json`` the authors' export tool writes or
without one (the architecture is then read from the weights' shapes, with the authors' class defaults
for what shapes do not tell: 72 channels per head, ``sample_size`` 32). V2 computes V1's function with a
split head (``models.convert``). The workdir's config is the same recipe with that model,
``distill.nfe`` (``--nfe``; else the folder name's ``_<N>step``, logged), ``model.time_scale``
(``--time_scale``: the network sees σ·time_scale, the authors' ``num_timesteps``: 1000 for their
``gmdit_*`` students of the DiT teacher, 1 for their ``gmrepa_*`` students of the REPA teacher; else
from the folder name, logged) and the VAE of ``--vae`` (a diffusers ``AutoencoderKL`` folder such as
``stabilityai/sd-vae-ft-ema``), copied as above. ``Sampler.from_checkpoint(workdir).sample(key, labels)``
then samples it with its policy (``solver='piflow'``).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from gmflow_jax import checkpoint as ckpt_lib
from gmflow_jax import storage
from gmflow_jax.models.convert import (
    WEIGHTS,
    convert_gmdit_state_dict,
    convert_spectrum_state_dict,
    read_config,
    read_diffusers_folder,
    read_weights,
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
    "constant_logstd": None,
    "attention_bias": True,
    "norm_eps": 1e-5,
}
# the authors' GMDiTTransformer2DModelV2 defaults (lakonlab/models/architecture/gmflow/gmdit_v2.py), for a student
# folder without config.json: only what the weights' shapes do not tell is taken from here
V2_DEFAULTS = {"attention_head_dim": 72, "sample_size": 32}
V2_WEIGHTS = ("proj_out_means.weight", "proj_out_logweights.weight")
STEPS_IN_NAME = re.compile(r"_(\d+)steps?(?:_|$)")


def find_parts(src: str) -> dict[str, str]:
    """``{'transformer'|'spectrum'|'vae': folder}`` recognised by their config fields (local, ``file://`` or
    ``gs://``)."""
    root = storage.workdir_path(src)
    if not root.is_dir():
        raise ValueError(f"--from {src!r} is not a folder; expected a published GMFlow pipeline folder.")
    parts: dict[str, str] = {}
    names = sorted(p.name for p in root.iterdir())
    students = [n for n in names if STEPS_IN_NAME.search(n)]
    hint = f" For a pi-Flow student, pass its own folder as --from (e.g. {root / students[0]})." if students else ""
    for name in names:
        config = root / name / "config.json"
        if not config.is_file():
            continue
        keys = set(json.loads(config.read_text()))
        for part, fields in (("transformer", TRANSFORMER_FIELDS), ("spectrum", SPECTRUM_FIELDS), ("vae", VAE_FIELDS)):
            if fields <= keys:
                if part in parts:
                    raise ValueError(f"{src} has two {part} folders: {parts[part]} and {name}.{hint}")
                parts[part] = str(root / name)
    if "transformer" not in parts:
        raise ValueError(
            f"{src} has no GM-DiT transformer folder (a subfolder whose config.json has {sorted(TRANSFORMER_FIELDS)}); "
            f"expected a published GMFlow pipeline folder.{hint}"
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


def _copy_vae(vae: str, workdir: ckpt_lib.epath.Path) -> None:
    """Copies the VAE folder's config and weights into ``<workdir>/vae``."""
    dest = workdir / "vae"
    dest.mkdir(parents=True, exist_ok=True)
    for path in (storage.workdir_path(vae) / "config.json", storage.workdir_path(weights_file(vae))):
        storage.copy_file(path, dest / path.name)


def _check_vae(vae: str) -> None:
    config = read_config(vae)
    if config is None or not VAE_FIELDS <= set(config):
        raise ValueError(
            f"--vae {vae!r} is not a diffusers AutoencoderKL folder (config.json with {sorted(VAE_FIELDS)})."
        )
    weights_file(vae)


def _check_new(workdir: ckpt_lib.epath.Path) -> None:
    if ckpt_lib.list_steps(workdir / ckpt_lib.CHECKPOINT_DIR):
        raise ValueError(f"--workdir {workdir} already holds checkpoints; expected a new or empty folder.")


def convert_states(config: ml_collections.ConfigDict, net_state: dict, spectrum_state: dict | None = None) -> dict:
    """The model of ``config.model``'s parameters (pure dict ``{'net', 'spectrum'}``, the model's dtypes) from the
    torch state dicts (``models.convert``); the model is built abstractly."""
    abstract = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
    _, params = split_params(abstract)
    pure = {"net": convert_gmdit_state_dict(net_state, abstract.net)}
    if spectrum_state is not None:
        pure["spectrum"] = convert_spectrum_state_dict(spectrum_state, abstract.spectrum)
    return jax.tree.map(lambda ref, v: jnp.asarray(v, ref.dtype), nnx.to_pure_dict(params), pure)


def write_workdir(workdir: str, config: ml_collections.ConfigDict, pure: dict, **meta: Any) -> str:
    """Writes weights-only step 0 (``params`` = ``ema`` = ``pure``) with the config (and ``meta``) into ``workdir``,
    and the config files; returns the step directory. The VAE folder, if any, must already be in place."""
    from gmflow_jax.train.config import write_config

    workdir = storage.workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    writer = ckpt_lib.Checkpointer(workdir, keep=1, async_save=False)
    try:
        state = {"step": jnp.zeros([], jnp.int32), "params": pure, "ema": pure}
        writer.save(0, state, None, {"step": 0, "config": json.loads(config.to_json_best_effort()), **meta})
    finally:
        writer.close()
    write_config(config, workdir)
    return str(workdir / ckpt_lib.CHECKPOINT_DIR / "0")


def convert_pipeline(src: str, workdir: str, *, dtype: str | None = None, vae: str | None = None) -> str:
    """Converts the pipeline folder ``src`` into ``workdir`` (see the module docstring); returns the step
    directory. ``dtype``: the compute dtype written into the config (default: the recipe's); ``vae``: a VAE
    folder for a pipeline that has none."""
    parts = find_parts(src)
    if vae is not None:
        if "vae" in parts:
            raise ValueError(f"--vae {vae!r}: the pipeline {src} has its own VAE ({parts['vae']}); pass one of them.")
        _check_vae(vae)
        parts["vae"] = vae
    out = storage.workdir_path(workdir)
    _check_new(out)
    t_config, t_state = read_diffusers_folder(parts["transformer"])
    s_config, s_state = read_diffusers_folder(parts["spectrum"]) if "spectrum" in parts else (None, None)
    config = model_config(t_config, s_config)
    if dtype is not None:
        config.model.dtype = dtype
    pure = convert_states(config, t_state, s_state)
    if "vae" in parts:
        config.model.vae = "vae"
        _copy_vae(parts["vae"], out)
    return write_workdir(workdir, config, pure, converted_from=str(storage.workdir_path(src)))


# --- the authors' pi-Flow students (GM-DiT V2) ------------------------------------------------------


def is_model_folder(src: str) -> bool:
    """Whether ``src`` holds model weights itself (``diffusion_pytorch_model[.<variant>].safetensors``), as a
    pi-Flow student folder does, rather than a pipeline's sub-folders."""
    root = storage.workdir_path(src)
    return root.is_dir() and any(p.name.startswith(WEIGHTS) and p.name.endswith(".safetensors") for p in root.iterdir())


def _count(state: dict[str, Any], pattern: str) -> int:
    found = {int(m.group(1)) for m in (re.fullmatch(pattern, k) for k in state) if m}
    return max(found) + 1 if found else 0


def v2_transformer_config(state: dict[str, Any], config: dict[str, Any] | None, src: str) -> dict[str, Any]:
    """The student's transformer config in the authors' field names: its ``config.json`` or, without one, the
    architecture read from the V2 weights' shapes (``V2_DEFAULTS`` for the head width and the sample size).
    ValueError naming the folder when the weights are not GM-DiT V2."""
    missing = [k for k in V2_WEIGHTS if k not in state]
    if missing:
        raise ValueError(
            f"{src} is not a GM-DiT V2 (pi-Flow student) folder: its weights have no {missing[0]} (a published "
            "GMFlow model is a pipeline folder with transformer/, vae/, ...)."
        )
    if config is not None:
        lacking = sorted(TRANSFORMER_FIELDS - set(config))
        if lacking:
            raise ValueError(f"{src}/config.json lacks {lacking}; expected the authors' GM-DiT V2 config.")
        if config.get("out_channels") not in (None, config.get("in_channels", 4)):
            raise ValueError(f"{src}/config.json: out_channels={config['out_channels']} differs from in_channels.")
        return config
    hidden, channels, patch, _ = state["pos_embed.proj.weight"].shape
    pp = patch * patch
    head_dim = V2_DEFAULTS["attention_head_dim"]
    if hidden % head_dim:
        raise ValueError(
            f"{src} has no config.json and its width {hidden} is not a multiple of the authors' default head width "
            f"{head_dim}: add the config.json the authors' export tool writes."
        )
    logstd_layers = _count(state, r"proj_out_logstds\.(\d+)\.weight")
    config = {
        "num_attention_heads": hidden // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": channels,
        "patch_size": patch,
        "sample_size": V2_DEFAULTS["sample_size"],
        "num_layers": _count(state, r"transformer_blocks\.(\d+)\..*"),
        "num_gaussians": state["proj_out_logweights.weight"].shape[0] // pp,
        "num_embeds_ada_norm": state["emb.class_embedder.embedding_table.weight"].shape[0] - 1,
        "gm_num_logstd_layers": (logstd_layers + 1) // 2,
    }
    if "proj_out_logstds.1.weight" in state:
        config["logstd_inner_dim"] = state["proj_out_logstds.1.weight"].shape[0]
    logging.info(
        "%s has no config.json: architecture from the weights' shapes (%s); %d heads of %d channels and sample_size "
        "%d are the authors' class defaults",
        src,
        ", ".join(f"{k}={v}" for k, v in config.items()),
        config["num_attention_heads"],
        head_dim,
        config["sample_size"],
    )
    return config


def _from_name(src: str, given: Any, flag: str, guess: Any, what: str) -> Any:
    """``given`` when the user passed it, else ``guess`` (read from the folder name; logged); ValueError naming
    the flag when neither."""
    if given is not None:
        return given
    if guess is None:
        raise ValueError(f"--{flag} is required: the folder name of {src} does not tell {what}.")
    logging.warning("%s = %s from the folder name %s (pass --%s to set it)", what, guess, src, flag)
    return guess


def convert_student(
    src: str,
    workdir: str,
    *,
    nfe: int | None = None,
    time_scale: float | None = None,
    vae: str | None = None,
    dtype: str | None = None,
) -> str:
    """Converts one of the authors' pi-Flow student folders (GM-DiT V2, see the module docstring) into ``workdir``;
    returns the step directory. ``nfe``: the student's steps (``distill.nfe``); ``time_scale``: the network's time
    scale (``model.time_scale``); both default to what the folder name says (``_<N>step``; ``gmrepa``: 1,
    ``gmdit``: 1000), logged, and are required otherwise. ``vae``: a diffusers ``AutoencoderKL`` folder copied
    into the workdir (without one, samples stay latents)."""
    name = storage.workdir_path(src).name
    steps = STEPS_IN_NAME.search(name)
    nfe = _from_name(src, nfe, "nfe", int(steps.group(1)) if steps else None, "the student's steps (distill.nfe)")
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"--nfe must be an integer >= 1 (the student's network evaluations); got {nfe!r}.")
    guess = 1.0 if name.startswith("gmrepa") else 1000.0 if name.startswith("gmdit") else None
    time_scale = _from_name(src, time_scale, "time_scale", guess, "the network's time scale (model.time_scale)")
    if not time_scale > 0:
        raise ValueError(f"--time_scale must be > 0 (the network sees σ·time_scale); got {time_scale!r}.")
    if vae is not None:
        _check_vae(vae)
    out = storage.workdir_path(workdir)
    _check_new(out)
    state, metadata = read_weights(src)
    policy = json.loads(metadata.get("policy_config", "{}")).get("type", "GMFlow")
    if policy != "GMFlow":
        raise ValueError(
            f"{src} is a pi-Flow student with a {policy!r} policy; only GMFlow (GM) policies are supported."
        )
    config = model_config(v2_transformer_config(state, read_config(src), src), None)
    config.model.time_scale = float(time_scale)
    config.distill.nfe = nfe
    if dtype is not None:
        config.model.dtype = dtype
    pure = convert_states(config, state)
    if vae is not None:
        config.model.vae = "vae"
        _copy_vae(vae, out)
    else:
        logging.warning("no --vae: %s's samples are latents (decode needs config.model.vae)", workdir)
    return write_workdir(workdir, config, pure, converted_from=str(storage.workdir_path(src)))


def convert(src: str, workdir: str, *, nfe=None, time_scale=None, vae=None, dtype=None) -> str:
    """``convert_student`` for a model folder (``is_model_folder``), else ``convert_pipeline``; ``nfe`` and
    ``time_scale`` are refused for a pipeline (a GMFlow model, not a student)."""
    if is_model_folder(src):
        return convert_student(src, workdir, nfe=nfe, time_scale=time_scale, vae=vae, dtype=dtype)
    for flag, value in (("nfe", nfe), ("time_scale", time_scale)):
        if value is not None:
            raise ValueError(
                f"--{flag} is for a pi-Flow student folder (GM-DiT V2 weights in it); {src} holds no weights itself "
                "(a GMFlow pipeline folder has transformer/, vae/, ...)."
            )
    return convert_pipeline(src, workdir, dtype=dtype, vae=vae)
