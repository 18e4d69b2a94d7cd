"""Train state (params, EMA, optimizer state, step, RNG), the optimizer, and sharded initialisation.

Parameters are plain nested dicts (``nnx.to_pure_dict`` of the model's ``nnx.Param``s,
``{'net': ..., 'spectrum': ...}``): ``nnx.merge(graphdef, params)`` rebuilds the model, and the
same tree is what checkpoints store. ``setup_state`` derives every array's ``NamedSharding`` from
the parameters' logical axis names without allocating anything (``nnx.eval_shape``), and
``init_state`` is a jitted init whose ``out_shardings`` create the parameters already sharded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from gmflow_jax.models.factory import build_model, split_params
from gmflow_jax.sharding import check_rules, replicated, tree_shardings

Params = dict[str, Any]


@struct.dataclass
class TrainState:
    """Everything a step changes: ``step`` (int32 scalar, steps done), ``params``, ``ema``,
    ``opt_state``, ``rng`` (uint32 (2,) base key of the training randomness)."""

    step: jax.Array
    params: Params
    ema: Params
    opt_state: Any
    rng: jax.Array

    def to_dict(self) -> dict[str, Any]:
        """The checkpointed tree."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


class ClipFromState(NamedTuple):
    count: jax.Array


def clip_by_global_norm_from(max_norm: float, start_step: int) -> optax.GradientTransformation:
    """Global-norm clipping to ``max_norm``, applied only from update ``start_step`` on."""

    def init(params: Any) -> ClipFromState:
        del params
        return ClipFromState(jnp.zeros([], jnp.int32))

    def update(updates: Any, state: ClipFromState, params: Any = None) -> tuple[Any, ClipFromState]:
        del params
        norm = optax.tree.norm(updates)
        clip = (state.count >= start_step) & (norm > max_norm)
        scale = jnp.where(clip, max_norm / jnp.maximum(norm, 1e-30), 1.0)
        updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
        return updates, ClipFromState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def decay_mask(params: Params) -> Params:
    """True for every parameter that gets weight decay: all but biases."""

    def one(path: tuple, _: Any) -> bool:
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) != "bias"

    return jax.tree_util.tree_map_with_path(one, params)


def frozen_mask(params: Params) -> Params:
    """True for every parameter whose exact gradient is zero: the attention key projection's bias (softmax over
    the keys ignores a constant added to every key's score). Its float32 gradient is rounding noise, which
    AdamW would turn into steps of ±lr: it is left out of the update and keeps its initial (or converted) value."""

    def one(path: tuple, _: Any) -> bool:
        names = [getattr(p, "key", getattr(p, "name", None)) for p in path[-3:]]
        return names == ["attn", "key", "bias"]

    return jax.tree_util.tree_map_with_path(one, params)


def without_frozen(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` fed zero gradients for the ``frozen_mask`` parameters (so their moments and updates stay 0);
    the optimizer state keeps ``tx``'s structure."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        updates = jax.tree.map(lambda u, frozen: jnp.zeros_like(u) if frozen else u, updates, frozen_mask(updates))
        return tx.update(updates, state, params)

    return optax.GradientTransformation(tx.init, update)


def lr_schedule(ocfg: Any) -> optax.Schedule:
    """Linear warm-up from ``warmup_init_factor × lr``, then constant, or (``decay_steps > 0``) cosine
    decay to ``final_lr_factor × lr`` over the ``decay_steps`` steps after the warm-up."""
    after = (
        optax.cosine_decay_schedule(ocfg.lr, ocfg.decay_steps, alpha=ocfg.final_lr_factor)
        if ocfg.decay_steps > 0
        else optax.constant_schedule(ocfg.lr)
    )
    if ocfg.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(ocfg.lr * ocfg.warmup_init_factor, ocfg.lr, ocfg.warmup_steps)
    return optax.join_schedules([warmup, after], [ocfg.warmup_steps])


def make_optimizer(ocfg: Any) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
    """AdamW on ``lr_schedule(ocfg)``, clipping from ``clip_start``; the ``frozen_mask`` parameters stay put."""
    schedule = lr_schedule(ocfg)
    parts = []
    if ocfg.clip_norm > 0:
        parts.append(clip_by_global_norm_from(ocfg.clip_norm, ocfg.clip_start))
    parts.append(
        optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay, mask=decay_mask)
    )
    return without_frozen(optax.chain(*parts)), schedule


@dataclasses.dataclass(frozen=True)
class StateSetup:
    """Static description of the train state: model graph, abstract arrays and their shardings."""

    graphdef: nnx.GraphDef
    abstract: TrainState  # jax.ShapeDtypeStruct leaves carrying their shardings
    shardings: TrainState  # NamedSharding leaves
    tx: optax.GradientTransformation
    schedule: Callable[[Any], jax.Array]
    init_fn: Callable[[jax.Array], TrainState]  # key -> state (not jitted)

    def num_params(self) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(self.abstract.params))


def setup_state(config: Any, mesh: Mesh) -> StateSetup:
    """Builds the abstract state and its shardings from ``config`` (no parameters allocated)."""
    rules = check_rules(config.sharding)
    tx, schedule = make_optimizer(config.optim)
    abstract_model = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
    graphdef, abs_params = split_params(abstract_model)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abs_params))
    abs_params = nnx.to_pure_dict(abs_params)
    param_sh = tree_shardings(logical, abs_params, rules, mesh)

    def init_fn(key: jax.Array) -> TrainState:
        _, params = split_params(build_model(config.model, nnx.Rngs(key)))
        params = nnx.to_pure_dict(params)
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            ema=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            rng=jnp.zeros((2,), jnp.uint32),
        )

    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    rep = replicated(mesh)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, sh: sh,
        abstract.opt_state,
        param_sh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    shardings = TrainState(step=rep, params=param_sh, ema=param_sh, opt_state=opt_sh, rng=rep)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return StateSetup(graphdef, abstract, shardings, tx, schedule, init_fn)


def init_state(setup: StateSetup, seed: int) -> TrainState:
    """A fresh state, created sharded: params from ``seed``'s init key, ``rng`` its train key."""
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))

    def init(init_key: jax.Array, train_key: jax.Array) -> TrainState:
        return setup.init_fn(init_key).replace(rng=train_key)

    return jax.jit(init, out_shardings=setup.shardings)(init_key, train_key)


def ema_beta(step: jax.Array, batch_size: int, max_nimg: float, ratio: float) -> jax.Array:
    """method.md §9: ``0.5 ** (batch / max(ema_nimg, 1e-8))``, ``ema_nimg = min(max_nimg, ratio·(step+1)·batch)``."""
    images_seen = (jnp.asarray(step, jnp.float32) + 1.0) * batch_size
    ema_nimg = jnp.minimum(max_nimg, ratio * images_seen)
    return jnp.power(0.5, batch_size / jnp.maximum(ema_nimg, 1e-8))


def power_ema_beta(step: jax.Array, gamma: float, start_step: int) -> jax.Array:
    """method.md §9, the pi-Flow recipes' power EMA (Karras et al.): ``(1 − 1/t)^(γ+1)``,
    ``t = max(step + 1 − start_step, 1)``; 0 (the EMA copies the weights) up to ``step = start_step``.

    ``step`` counts the optimizer steps done before this one, as the authors' hook reads ``runner.iter``
    (mmcv calls ``after_train_iter`` after the optimizer step and before ``iter`` is incremented).
    """
    t = jnp.maximum(jnp.asarray(step, jnp.float32) + 1.0 - start_step, 1.0)
    return jnp.exp((gamma + 1.0) * jnp.log1p(-1.0 / t))


def ema_beta_for(step: jax.Array, batch_size: int, ecfg: Any) -> jax.Array:
    """β of ``config.ema``: ``kind='power'`` (``power_ema_beta``) or the default ``'rampup'`` (``ema_beta``)."""
    if ecfg.kind == "power":
        return power_ema_beta(step, ecfg.gamma, ecfg.start_step)
    return ema_beta(step, batch_size, ecfg.max_nimg, ecfg.ratio)


def ema_update(ema: Params, params: Params, beta: jax.Array) -> Params:
    """``ema ← β·ema + (1 − β)·params`` leaf-wise."""
    return jax.tree.map(lambda e, p: (beta * e + (1.0 - beta) * p).astype(e.dtype), ema, params)
