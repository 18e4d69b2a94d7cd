"""The loss (docs/method.md §5) and the pure train step ``(state, batch) -> (state, metrics)``.

Randomness comes only from ``fold_in(state.rng, state.step)``, so the step is a deterministic
function of its inputs and a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from gmflow_jax.flow import diffuse, to_tau
from gmflow_jax.losses import l2_flow_loss, sample_t, spectral_loss, transition_nll, transition_pair
from gmflow_jax.models.factory import data_shape
from gmflow_jax.sharding import batch_spec_sharding, replicated
from gmflow_jax.train.state import Params, StateSetup, TrainState, ema_beta, ema_update

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def drop_labels(key: jax.Array, labels: jax.Array, num_classes: int, p: float) -> jax.Array:
    """Replaces each label by the null class ``num_classes`` with probability ``p``: (N,) -> (N,)."""
    if p <= 0.0 or num_classes <= 0:
        return labels
    return jnp.where(jax.random.uniform(key, labels.shape) < p, num_classes, labels).astype(labels.dtype)


def loss_fn(graphdef: nnx.GraphDef, params: Params, batch: Batch, key: jax.Array, config: Any) -> tuple:
    """Scalar loss and its terms for a batch ``{'image': (N, ...) float32, 'label': (N,) int32}``."""
    lcfg, mcfg = config.loss, config.model
    model = nnx.merge(graphdef, params)
    x0 = batch["image"].astype(jnp.float32)
    n = x0.shape[0]
    k_t, k_x, k_label = jax.random.split(key, 3)
    labels = drop_labels(k_label, batch["label"].astype(jnp.int32), mcfg.num_classes, lcfg.label_dropout)
    t = sample_t(k_t, n, mode=lcfg.t_mode, shift=lcfg.t_shift)
    terms: dict[str, jax.Array] = {}
    if lcfg.objective == "l2":
        eps = jax.random.normal(k_x, x0.shape, jnp.float32)
        x_t = diffuse(x0, eps, t)
        gm_u = model.net(x_t, to_tau(t), labels)
        terms["loss_l2"] = lcfg.weight * jnp.mean(l2_flow_loss(gm_u.means[..., 0, :], eps - x0))
    else:
        x_t, x_lo, t_lo = transition_pair(k_x, x0, t, lcfg.trans_ratio)
        gm_u = model.net(x_t, to_tau(t), labels)
        terms["loss_trans"] = lcfg.weight * jnp.mean(transition_nll(gm_u, x_t, t, x_lo, t_lo))
        if model.spectrum is not None and lcfg.spectral_weight > 0:
            spec = spectral_loss(gm_u, x_t, x0, t, model.spectrum)
            terms["loss_spec"] = lcfg.spectral_weight * jnp.mean(spec)
    loss = sum(terms.values())
    aux = dict(terms, logstd=jnp.mean(gm_u.logstds))
    return loss, aux


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: Callable[[Any], jax.Array],
    config: Any,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The (unjitted) step: loss, grads, AdamW, EMA; metrics are float32 scalars."""
    nan_at = int(config.debug.nan_at_step)
    batch_size = int(config.batch_size)

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(lambda p: loss_fn(graphdef, p, batch, key, config), has_aux=True)
        (loss, aux), grads = grad_fn(state.params)
        if nan_at >= 0:  # debug: poison this step (loss and grads), as a diverged step would be
            poison = jnp.where(state.step == nan_at, jnp.nan, 1.0)
            loss = loss * poison
            grads = jax.tree.map(lambda g: g * poison, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        beta = ema_beta(state.step, batch_size, config.ema.max_nimg, config.ema.ratio)
        ema = ema_update(state.ema, params, beta)
        metrics = dict(
            aux,
            loss=loss,
            grad_norm=optax.tree.norm(grads),
            param_norm=optax.tree.norm(params),
            lr=jnp.asarray(schedule(state.step), jnp.float32),
            ema_beta=beta,
        )
        new_state = state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state)
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return step_fn


StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def jit_train_step(config: Any, setup: StateSetup, mesh: Mesh) -> StepFn:
    """The trainer's compiled step: state sharded as ``setup``, batch split over the whole mesh, the
    state donated; metrics replicated. The ahead-of-time compile (``gmflow_jax.aot``) lowers this same one."""
    return jax.jit(
        make_train_step(setup.graphdef, setup.tx, setup.schedule, config),
        in_shardings=(setup.shardings, batch_spec_sharding(mesh)),
        out_shardings=(setup.shardings, replicated(mesh)),
        donate_argnums=0,
    )


def abstract_batch(config: Any, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step takes, as shapes: ``image`` (N, *data_shape) float32, ``label`` (N,)
    int32, both split over the whole mesh (the layout of every data iterator)."""
    sharding = batch_spec_sharding(mesh)
    n = int(config.batch_size)
    return {
        "image": jax.ShapeDtypeStruct((n, *data_shape(config.model)), jnp.float32, sharding=sharding),
        "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
    }


def compiled_train_step(config: Any, setup: StateSetup, mesh: Mesh) -> StepFn:
    """``jit_train_step``, compiled now from shapes alone (``setup.abstract``, ``abstract_batch``);
    calling it with a real state and batch does not compile again. The trainer compiles before it
    creates or restores the state, so that the compiler's transient memory is not on top of it."""
    step_fn = jit_train_step(config, setup, mesh)
    step_fn.lower(setup.abstract, abstract_batch(config, mesh)).compile()
    return step_fn
