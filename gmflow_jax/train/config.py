"""The trainer's config: schema (``base_config``), validation (``validate_config``) and loading.

``load_config(path_or_name, arg)`` is the one way configs are read (trainer, demo, bench, tests):
a packaged experiment by name (``'digits_gmdit'``, the files of the repository's ``configs/``,
installed as ``gmflow_jax.configs``) or any file path, with ``get_config(arg)``. Every experiment
file starts from ``base_config()`` and changes values. Fields:

* ``seed``, ``num_steps``, ``batch_size`` (global), ``grad_accum_steps`` (each step's batch split into that
  many micro-batches whose gradients are averaged before one optimizer step), ``mesh = (data, fsdp)`` (one
  may be -1), ``sharding``: logical axis name → mesh axis (``''`` replicated), ``windowed_einsum`` (TPU only;
  ``False`` keeps FSDP's collectives out of XLA's windowed-einsum loops, docs/performance.md §9),
  ``init_from``: a checkpoint (a step directory or a workdir / checkpoint root: its latest step) whose
  weights start the run.
* ``data``: ``dataset`` (a name of ``gmflow_jax.data.KNOWN_DATASETS``), ``data_dir`` (``''``:
  ``$GMFLOW_DATA_DIR`` or ``~/tensorflow_datasets``), ``read``: ``'per_process'`` (each process
  reads its own shard) or ``'global'`` (every process reads the whole global batch and keeps its
  rows: the stream is then independent of the process layout) or ``'device'`` (small datasets:
  held whole on every device, batches drawn by a jitted gather; see ``gmflow_jax.data.device``),
  ``worker_count``, ``prefetch``, ``image_size``: the side of the images a latent dataset was encoded
  from (``imagenet_latents``: checked against the dataset's record, with ``model.vae``; 0: not checked).
* ``model``: see ``gmflow_jax.models.factory`` (remat_policy too); ``model.vae``: the diffusers ``AutoencoderKL`` folder
  whose (scaled) latents the model works in, ``''`` for pixel-space data; a relative path is
  relative to the run's workdir (the Sampler decodes with it).
* ``loss``: ``objective`` ('gm' transition loss or 'l2' flow matching), ``trans_ratio`` λ, ``t_mode``
  ('uniform' | 'logit_normal'), ``t_shift``, ``weight``, ``spectral_weight``, ``label_dropout``.
* ``optim``: AdamW ``lr``, ``b1``, ``b2``, ``eps``, ``weight_decay`` (none on biases),
  ``warmup_steps`` (linear from ``warmup_init_factor × lr``), then constant or, with
  ``decay_steps > 0``, cosine decay to ``final_lr_factor × lr``; ``clip_norm`` (0: off) applied
  from step ``clip_start`` on.
* ``ema`` (method.md §9): ``kind`` 'rampup' (``max_nimg``, ``ratio``) or 'power' (``gamma``, ``start_step``).
* ``checkpoint``: ``every_steps``, ``keep``, ``async_save``, ``preemption_check_every``
  (multi-process runs agree on a stop signal every that many steps), ``lock_lease_seconds`` (the
  workdir lock's lease: a lock from another host not renewed for that long is taken over).
* ``log``: ``every_steps`` (scalars), ``progress_every_steps``, ``sample_every_steps`` (0: off),
  ``sample_steps`` / ``sample_order`` (GM-ODE), ``sample_classes`` × ``sample_per_class`` images
  or ``sample_points`` 2-D points; ``profile_first_step`` (0: off) starts a ``jax.profiler`` trace
  of ``profile_steps`` steps into ``<workdir>/tensorboard``.
* ``distill`` (pi-Flow, docs/method.md §10): ``nfe`` (0: not a student; N ≥ 1: the model is a pi-Flow
  student sampled with N network evaluations, ``solver='piflow'``), ``teacher`` (the teacher's workdir
  for pi-ID training: any workdir the Sampler reads), ``teacher_config`` (a packaged config, ``name[:arg]``,
  whose model and loss are the teacher's: what ``gmflow_jax.aot`` compiles when no teacher workdir is
  given), ``total_substeps`` S, ``temperature`` (sampling, all but the last step), ``final_step_size_scale``,
  ``shift`` (raw time → σ), pi-ID's ``num_intermediate_states``, ``gm_dropout``, ``teacher_ratio`` (decaying
  linearly to 0 over ``num_decay_iters``), ``window_substeps``, ``scale`` (the loss is scale · ½ · MSE); the teacher's
  ``guidance`` (a GMFlow teacher: probabilistic guidance w̃ with projection ``orthogonal``; a
  flow-matching teacher, ``loss.objective='l2'``: the CFG scale, 0 or 1 for none) applied where the
  noise level σ = τ/1000 lies in ``guidance_interval`` (the authors' ImageNet recipe: (0, 0.6)).
* ``debug``: ``nan_at_step`` (≥ 0 makes that step's loss NaN, to test the NaN guard).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import pkgutil
from typing import Any

import ml_collections
from absl import logging

from gmflow_jax.checkpoint import config_changes
from gmflow_jax.models.factory import MODEL_KINDS, check_remat_policy
from gmflow_jax.storage import workdir_path, write_atomic

CONFIG_PACKAGE = "gmflow_jax.configs"

# Logical axis names used by the models (gmflow_jax.models.gmdit.LOGICAL_AXES).
LOGICAL_AXIS_NAMES = ("embed", "mlp", "heads", "vocab", "patch", "freq", "out")


def replicated_rules() -> ml_collections.ConfigDict:
    """Every logical axis replicated (small models)."""
    return ml_collections.ConfigDict({name: "" for name in LOGICAL_AXIS_NAMES})


def fsdp_rules() -> ml_collections.ConfigDict:
    """FSDP: the hidden dimension of every parameter split over 'fsdp' (large models)."""
    rules = replicated_rules()
    rules.embed = "fsdp"
    return rules


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by all experiments (a small replicated GM-DiT on digits)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 1000
    c.batch_size = 128
    c.grad_accum_steps = 1
    c.mesh = (-1, 1)
    c.sharding = replicated_rules()
    c.windowed_einsum = True  # XLA's default
    c.init_from = ""

    c.data = ml_collections.ConfigDict(
        dict(dataset="digits", data_dir="", read="per_process", worker_count=0, prefetch=2, image_size=0)
    )

    c.model = ml_collections.ConfigDict(
        dict(
            kind="gmdit",
            arch="",
            input_size=8,
            in_channels=1,
            num_gaussians=8,
            num_classes=10,
            patch_size=2,
            hidden_size=128,
            depth=4,
            num_heads=4,
            mlp_ratio=4.0,
            freq_shift=0.0,
            logstd_inner_dim=256,
            time_scale=1000.0,
            dtype="float32",
            remat=False,
            remat_policy="",
            spectrum=True,
            spectrum_base_size=(8, 8),
            vae="",
        )
    )
    c.loss = ml_collections.ConfigDict(
        dict(
            objective="gm",
            trans_ratio=0.5,
            t_mode="logit_normal",
            t_shift=1.0,
            weight=2.0,
            spectral_weight=1.0,
            label_dropout=0.1,
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=2e-4,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.05,
            warmup_steps=1000,
            warmup_init_factor=1e-3,
            decay_steps=0,
            final_lr_factor=0.01,
            clip_norm=10.0,
            clip_start=1000,
        )
    )
    c.ema = ml_collections.ConfigDict(dict(kind="rampup", max_nimg=30e6, ratio=0.05, gamma=7.0, start_step=0))
    c.checkpoint = ml_collections.ConfigDict(
        dict(every_steps=500, keep=3, async_save=True, preemption_check_every=10, lock_lease_seconds=600.0)
    )
    c.log = ml_collections.ConfigDict(
        dict(
            every_steps=50,
            progress_every_steps=100,
            sample_every_steps=500,
            sample_steps=8,
            sample_order=2,
            sample_classes=10,
            sample_per_class=10,
            sample_points=4096,
            profile_first_step=0,
            profile_steps=5,
        )
    )
    c.distill = ml_collections.ConfigDict(
        dict(
            nfe=0,
            teacher="",
            teacher_config="",
            total_substeps=128,
            temperature=1.0,
            final_step_size_scale=1.0,
            shift=1.0,
            num_intermediate_states=2,
            gm_dropout=0.05,
            teacher_ratio=0.0,
            num_decay_iters=0,
            window_substeps=0,
            guidance=0.0,
            guidance_interval=(0.0, 1.0),
            orthogonal=1.0,
            scale=3.0,
        )
    )
    c.debug = ml_collections.ConfigDict(dict(nan_at_step=-1))
    return c


def toy_model_config(num_gaussians: int = 64, learn_std: bool = True) -> ml_collections.ConfigDict:
    """``config.model`` for the 2-D ``ToyGMFlow``."""
    return ml_collections.ConfigDict(
        dict(
            kind="toy",
            num_gaussians=num_gaussians,
            channels=2,
            num_classes=0,
            hidden=256,
            num_layers=5,
            num_freqs=8,
            learn_std=learn_std,
            spectrum=False,
        )
    )


def packaged_configs() -> list[str]:
    """Names of the packaged experiment configs (``load_config(name)``)."""
    package = importlib.import_module(CONFIG_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def load_config(path_or_name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The locked ``get_config(arg)`` of an experiment.

    ``path_or_name``: a packaged config name (``'digits_gmdit'``) or a ``.py`` file path; a
    ``':arg'`` suffix (``'checkerboard_k64:baseline'``) gives ``arg`` when ``arg`` is None.
    ``ValueError`` naming the config if it does not exist or does not load.
    """
    spec, sep, suffix = str(path_or_name).partition(":")
    if sep and arg is None:
        arg = suffix
    if spec.endswith(".py") or os.sep in spec:
        path = os.path.abspath(os.path.expanduser(spec))
        if not os.path.isfile(path):
            raise ValueError(f"config file {spec!r} does not exist (resolved to {path}).")
        module_spec = importlib.util.spec_from_file_location(f"gmflow_config_{os.path.basename(spec)[:-3]}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        names = packaged_configs()
        if spec not in names:
            raise ValueError(f"config {spec!r} is neither a .py file nor a packaged config; expected one of {names}.")
        module = importlib.import_module(f"{CONFIG_PACKAGE}.{spec}")
    if not hasattr(module, "get_config"):
        raise ValueError(f"config {spec!r} has no get_config(arg=None) function.")
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except (TypeError, KeyError, AttributeError) as e:  # e.g. a string where the schema has a number
        raise ValueError(f"config {spec!r}: get_config failed: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"config {spec!r}: get_config returned {type(config).__name__}, expected a ConfigDict.")
    check_schema(config)
    config.lock()
    return config


def schema_for(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The schema a config must follow: ``base_config()``, with the toy model's fields for ``model.kind='toy'``."""
    schema = base_config()
    if config.get("model", {}).get("kind") == "toy":
        schema.model = toy_model_config()
    return schema


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int | float):
        return "an int" if isinstance(value, int) else "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, tuple | list):
        return "a tuple"
    if isinstance(value, ml_collections.ConfigDict | dict):
        return "a group of fields"
    return type(value).__name__


def check_schema(config: ml_collections.ConfigDict, schema: Any = None, prefix: str = "config") -> None:
    """``ValueError`` for the first field that the schema does not have (naming the nearest known field) or
    whose value is of another kind than the schema's (an int where the schema has an int; a number
    where it has a float; bools, strings, tuples and groups as they are)."""
    schema = schema_for(config) if schema is None else schema
    for key, value in config.items():
        field = f"{prefix}.{key}"
        if key not in schema:
            near = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f"; did you mean {prefix}.{near[0]}?" if near else f"; expected one of {sorted(schema.keys())}"
            raise ValueError(f"{field} is not a field of the config schema{hint}")
        expected = schema[key]
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ValueError(f"{field} must be a group of fields; got {value!r}.")
            check_schema(value, expected, field)
        elif expected is not None and value is not None:
            want, got = _kind(expected), _kind(value)
            if want != got and not (want == "a number" and got == "an int"):
                raise ValueError(f"{field} must be {want} (as in the schema); got {value!r} ({type(value).__name__}).")


def define_config_flag(name: str, help_string: str) -> Any:
    """An absl ``--<name>`` flag read with ``load_config``, overridable by ``--<name>.field=value`` (locked).

    Call it only from a ``__main__`` module: flags are defined there and nowhere else.
    """
    from absl import flags
    from ml_collections.config_flags import config_flags

    class Parser(flags.ArgumentParser):
        def parse(self, argument: str) -> ml_collections.ConfigDict:
            return load_config(argument)

        def flag_type(self) -> str:
            return "config object"

    # ml_collections' config-file flag (it handles the --<name>.field overrides), with our loader.
    flag = config_flags._ConfigFlag(
        parser=Parser(),
        serializer=flags.ArgumentSerializer(),
        name=name,
        default=None,
        help_string=help_string,
        flag_values=flags.FLAGS,
    )
    return flags.DEFINE_flag(flag, flags.FLAGS)


def resolve_data_dir(data_dir: str) -> str:
    """``''`` → ``$GMFLOW_DATA_DIR`` or ``~/tensorflow_datasets``; env vars expanded; then as ``workdir_path``
    (a local path made absolute, ``gs://`` kept: such a dataset is read through a local copy)."""
    if not data_dir:
        data_dir = os.environ.get("GMFLOW_DATA_DIR") or "~/tensorflow_datasets"
    return str(workdir_path(os.path.expandvars(data_dir)))


def _need(cond: bool, field: str, expected: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"config.{field} must be {expected}; got {value!r}.")


def _int(c: Any, field: str, lo: int | None = None) -> None:
    v = _get(c, field)
    ok = isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)
    _need(ok, field, "an int" + (f" >= {lo}" if lo is not None else ""), v)


def _num(c: Any, field: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> None:
    v = _get(c, field)
    ok = isinstance(v, int | float) and not isinstance(v, bool)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v <= hi
    lo_s = "" if lo is None else (f" > {lo}" if lo_open else f" >= {lo}")
    hi_s = "" if hi is None else f" <= {hi}"
    _need(ok, field, "a number" + lo_s + (" and" if lo_s and hi_s else "") + hi_s, v)


def _choice(c: Any, field: str, choices: tuple) -> None:
    v = _get(c, field)
    _need(v in choices, field, f"one of {choices}", v)


def _get(c: Any, field: str) -> Any:
    for part in field.split("."):
        c = c[part]
    return c


def validate_config(c: ml_collections.ConfigDict) -> None:
    """``ValueError`` naming the field and the expected value for anything wrong (before compiling)."""
    from gmflow_jax.data import KNOWN_DATASETS

    check_schema(c)
    _int(c, "seed", 0)
    _need(c.seed < 2**32, "seed", "an int in [0, 2**32)", c.seed)
    _int(c, "num_steps", 1)
    _int(c, "batch_size", 1)
    _int(c, "grad_accum_steps", 1)
    _need(
        c.batch_size % c.grad_accum_steps == 0,
        "grad_accum_steps",
        f"a divisor of config.batch_size={c.batch_size}",
        c.grad_accum_steps,
    )
    _need(isinstance(c.mesh, tuple | list) and len(c.mesh) == 2, "mesh", "a tuple (data, fsdp) of ints", c.mesh)
    _need(isinstance(c.init_from, str), "init_from", "a path string ('' for none)", c.init_from)

    ds = c.data.dataset
    _need(ds in KNOWN_DATASETS, "data.dataset", f"one of {KNOWN_DATASETS}", ds)
    _need(isinstance(c.data.data_dir, str), "data.data_dir", "a directory path string", c.data.data_dir)
    _choice(c, "data.read", ("per_process", "global", "device"))
    _int(c, "data.worker_count", 0)
    _int(c, "data.prefetch", 0)
    _int(c, "data.image_size", 0)

    m = c.model
    _choice(c, "model.kind", MODEL_KINDS)
    _int(c, "model.num_gaussians", 1)
    _int(c, "model.num_classes", 0)
    _need(isinstance(m.spectrum, bool), "model.spectrum", "a bool", m.spectrum)
    if m.kind == "toy":
        _need(
            ds.startswith("checkerboard"), "data.dataset", "a 2-D dataset ('checkerboard...') for model.kind='toy'", ds
        )
        _int(c, "model.channels", 1)
        _int(c, "model.hidden", 1)
        _int(c, "model.num_layers", 1)
        _need(not m.spectrum, "model.spectrum", "False for model.kind='toy' (no SpectrumMLP on 2-D points)", m.spectrum)
    else:
        _need(not ds.startswith("checkerboard"), "data.dataset", "an image dataset for model.kind='gmdit'", ds)
        _need(isinstance(m.arch, str), "model.arch", "a DiT size like 'XL/2' or '' for explicit sizes", m.arch)
        _int(c, "model.num_classes", 1)
        _int(c, "model.in_channels", 1)
        _choice(c, "model.dtype", ("float32", "bfloat16"))
        _num(c, "model.time_scale", 0.0, lo_open=True)
        check_remat_policy(m)
        if not m.arch:
            for f in ("patch_size", "hidden_size", "depth", "num_heads"):
                _int(c, f"model.{f}", 1)
    lo = c.loss
    _choice(c, "loss.objective", ("gm", "l2"))
    _num(c, "loss.trans_ratio", 0.0, 1.0)
    _choice(c, "loss.t_mode", ("uniform", "logit_normal"))
    _num(c, "loss.t_shift", 0.0, lo_open=True)
    _num(c, "loss.weight", 0.0, lo_open=True)
    _num(c, "loss.spectral_weight", 0.0)
    _num(c, "loss.label_dropout", 0.0, 1.0)
    if lo.objective == "l2":
        _need(
            m.num_gaussians == 1 and not m.spectrum and not m.get("learn_std", False),
            "model",
            "num_gaussians=1, learn_std=False and spectrum=False for loss.objective='l2'",
            {k: m.get(k) for k in ("num_gaussians", "learn_std", "spectrum")},
        )
    _num(c, "optim.lr", 0.0, lo_open=True)
    _num(c, "optim.b1", 0.0, 1.0)
    _num(c, "optim.b2", 0.0, 1.0)
    _num(c, "optim.eps", 0.0, lo_open=True)
    _num(c, "optim.weight_decay", 0.0)
    _int(c, "optim.warmup_steps", 0)
    _num(c, "optim.warmup_init_factor", 0.0, 1.0)
    _int(c, "optim.decay_steps", 0)
    _num(c, "optim.final_lr_factor", 0.0, 1.0)
    _num(c, "optim.clip_norm", 0.0)
    _int(c, "optim.clip_start", 0)
    _num(c, "ema.max_nimg", 0.0)
    _num(c, "ema.ratio", 0.0)
    _choice(c, "ema.kind", ("rampup", "power"))
    _num(c, "ema.gamma", 0.0)
    _int(c, "ema.start_step", 0)
    _int(c, "checkpoint.every_steps", 1)
    _int(c, "checkpoint.keep", 1)
    _need(isinstance(c.checkpoint.async_save, bool), "checkpoint.async_save", "a bool", c.checkpoint.async_save)
    _int(c, "checkpoint.preemption_check_every", 1)
    _num(c, "checkpoint.lock_lease_seconds", 0.0, lo_open=True)
    for f in ("every_steps", "progress_every_steps"):
        _int(c, f"log.{f}", 1)
    _int(c, "log.sample_every_steps", 0)
    _int(c, "log.sample_steps", 1)
    _choice(c, "log.sample_order", (1, 2))
    for f in ("sample_classes", "sample_per_class", "sample_points"):
        _int(c, f"log.{f}", 1)
    _int(c, "log.profile_first_step", 0)
    _int(c, "log.profile_steps", 1)
    _int(c, "debug.nan_at_step", -1)
    d = c.distill
    _int(c, "distill.nfe", 0)
    _need(isinstance(d.teacher, str), "distill.teacher", "a workdir path string ('' for none)", d.teacher)
    _need(isinstance(d.teacher_config, str), "distill.teacher_config", "a config name ('' for none)", d.teacher_config)
    _int(c, "distill.total_substeps", 1)
    _num(c, "distill.temperature", 0.0, lo_open=True)
    _num(c, "distill.final_step_size_scale", 0.0, lo_open=True)
    _num(c, "distill.shift", 0.0, lo_open=True)
    _int(c, "distill.num_intermediate_states", 1)
    _num(c, "distill.gm_dropout", 0.0, 1.0)
    _num(c, "distill.teacher_ratio", 0.0, 1.0)
    _int(c, "distill.num_decay_iters", 0)
    _int(c, "distill.window_substeps", 0)
    _num(c, "distill.guidance", 0.0)
    lo_hi = d.guidance_interval
    _need(
        isinstance(lo_hi, tuple | list) and len(lo_hi) == 2 and 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0,
        "distill.guidance_interval",
        "a pair (lo, hi) of noise levels with 0 <= lo <= hi <= 1",
        lo_hi,
    )
    _num(c, "distill.orthogonal", 0.0, 1.0)
    _num(c, "distill.scale", 0.0, lo_open=True)
    if d.teacher:
        _need(d.nfe >= 1, "distill.nfe", "an int >= 1 (the student's steps) when distill.teacher is set", d.nfe)
        _need(not m.spectrum, "model.spectrum", "False for a pi-Flow student (no spectral loss)", m.spectrum)


def write_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Writes ``config.json`` and ``config.yaml`` (a local, ``file://`` or ``gs://`` workdir); warns naming the
    fields that differ from the previous run's."""
    root = workdir_path(workdir)
    path = root / "config.json"
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(text):
            logging.warning("the config differs from the previous run's: %s", config_changes(old, json.loads(text)))
    for name, content in (("config.json", text), ("config.yaml", config.to_yaml())):
        write_atomic(root / name, content)
