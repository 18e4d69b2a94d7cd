"""Reading one step of a run for the ``Sampler``: its weights (EMA or raw) sharded as asked, its config, and
the pi-Flow sampling settings of ``config.distill``."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding

from gmflow_jax import checkpoint as ckpt_lib
from gmflow_jax.models.factory import build_model, split_params

# config.distill's sampling fields and their values where a config predates the section
DISTILL_DEFAULTS = {"nfe": 0, "total_substeps": 128, "temperature": 1.0, "final_step_size_scale": 1.0, "shift": 1.0}


class SamplingCheckpointError(ckpt_lib.CheckpointError, ValueError):
    """The path holds no usable checkpoint (missing, or the requested step is damaged)."""


def load_step(directory: str, step: int, which: str, sharding: NamedSharding) -> tuple[Any, ...]:
    """``(graphdef, params, config)`` of one step; ``which`` is 'ema' or 'params'. Raises on any problem."""
    problem = ckpt_lib.verify_step(directory, step)
    if problem is not None:
        raise SamplingCheckpointError(problem)
    config = ml_collections.ConfigDict(ckpt_lib.read_meta(directory, step)["config"])
    graphdef, abstract = split_params(nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0), remat=False)))
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), nnx.to_pure_dict(abstract)
    )
    params = ckpt_lib.restore(directory, step, {which: abstract})[which]
    if not ckpt_lib.all_finite(params):
        raise SamplingCheckpointError(f"non-finite {which} weights")
    return graphdef, params, config


def distill_settings(config: Any) -> dict[str, Any]:
    """The pi-Flow sampling fields of ``config.distill`` (``DISTILL_DEFAULTS`` for any it lacks: a run whose
    config predates the section is not a student)."""
    d = config.get("distill", None) or {}
    return {k: type(v)(d.get(k, v)) for k, v in DISTILL_DEFAULTS.items()}
