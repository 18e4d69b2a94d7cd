"""The loss (docs/method.md §5) and the pure train step ``(state, batch) -> (state, metrics)``.

Randomness comes only from ``fold_in(state.rng, state.step)``, so the step is a deterministic
function of its inputs and a resumed run repeats an uninterrupted one exactly. Every draw of the loss
is made per example, from that key folded with the example's index in the global batch
(``gmflow_jax.randomness``): the step computes the same thing however the batch is laid over devices
or split into the ``config.grad_accum_steps`` micro-batches whose gradients it accumulates (up to
float32 summation order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gmflow_jax.flow import diffuse, to_tau
from gmflow_jax.losses import l2_flow_loss, sample_t, spectral_loss, transition_nll, transition_pair
from gmflow_jax.models.factory import data_shape
from gmflow_jax.randomness import example_keys, per_example
from gmflow_jax.sharding import MESH_AXES, batch_spec_sharding, replicated
from gmflow_jax.train import distill
from gmflow_jax.train.state import Params, StateSetup, TrainState, ema_beta_for, ema_update

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def drop_labels(key: jax.Array, labels: jax.Array, num_classes: int, p: float) -> jax.Array:
    """Replaces each label by the null class ``num_classes`` with probability ``p``: (N,) -> (N,)."""
    if p <= 0.0 or num_classes <= 0:
        return labels
    return jnp.where(jax.random.uniform(key, labels.shape) < p, num_classes, labels).astype(labels.dtype)


def one_at_a_time(draw: Callable[..., Any]) -> Callable[..., Any]:
    """``draw`` (a batch function of ``losses``) run on one example as a batch of one: ``(key, *rows)`` ->
    its outputs without the batch axis. So the batch functions draw per example."""

    def one(key, *rows):
        return jax.tree.map(lambda y: y[0], draw(key, *(r[None] for r in rows)))

    return one


def loss_fn(
    graphdef: nnx.GraphDef,
    params: Params,
    batch: Batch,
    key: jax.Array,
    config: Any,
    index: jax.Array | None = None,
    teacher: tuple[distill.TeacherFn, Any] | None = None,
) -> tuple:
    """Scalar loss (mean over the batch) and its terms for ``{'image': (N, ...) float32, 'label': (N,) int32}``.

    ``index`` (N,) int: the examples' positions in the global batch (default ``0 … N−1``); example ``i``'s
    time, noise, transition pair and label dropout are drawn from ``fold_in(key, index[i])``.
    ``teacher = (teacher_fn, teacher_ratio)``: the pi-ID objective of a pi-Flow student instead
    (``distill.piid_objective``), its draws from the same per-example keys.
    """
    lcfg, mcfg = config.loss, config.model
    model = nnx.merge(graphdef, params)
    x0 = batch["image"].astype(jnp.float32)
    n = x0.shape[0]
    index = jnp.arange(n, dtype=jnp.int32) if index is None else index
    if teacher is not None:
        return distill.piid_objective(model, batch, example_keys(key, index), config, *teacher)
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(example_keys(key, index))
    k_t, k_x, k_label = keys[:, 0], keys[:, 1], keys[:, 2]
    labels = per_example(
        k_label,
        one_at_a_time(lambda k, y: drop_labels(k, y, mcfg.num_classes, lcfg.label_dropout)),
        batch["label"].astype(jnp.int32),
    )
    t = per_example(k_t, one_at_a_time(lambda k: sample_t(k, 1, mode=lcfg.t_mode, shift=lcfg.t_shift)))
    terms: dict[str, jax.Array] = {}
    if lcfg.objective == "l2":
        eps = per_example(k_x, one_at_a_time(lambda k, x: jax.random.normal(k, x.shape, jnp.float32)), x0)
        x_t = diffuse(x0, eps, t)
        gm_u = model.net(x_t, to_tau(t), labels)
        terms["loss_l2"] = lcfg.weight * jnp.mean(l2_flow_loss(gm_u.means[..., 0, :], eps - x0))
    else:
        pair = one_at_a_time(lambda k, x, tt: transition_pair(k, x, tt, lcfg.trans_ratio))
        x_t, x_lo, t_lo = per_example(k_x, pair, x0, t)
        gm_u = model.net(x_t, to_tau(t), labels)
        terms["loss_trans"] = lcfg.weight * jnp.mean(transition_nll(gm_u, x_t, t, x_lo, t_lo))
        if model.spectrum is not None and lcfg.spectral_weight > 0:
            spec = spectral_loss(gm_u, x_t, x0, t, model.spectrum)
            terms["loss_spec"] = lcfg.spectral_weight * jnp.mean(spec)
    loss = sum(terms.values())
    aux = dict(terms, logstd=jnp.mean(gm_u.logstds))
    return loss, aux


def micro_batches(batch: Batch, k: int, shards: int) -> Batch:
    """``(N, ...) -> (k, N/k, ...)``: micro-batch ``j`` takes rows ``j·m … (j+1)·m − 1`` of each of the
    ``shards`` equal blocks the batch is laid out in over the devices (``m = N / (shards · k)``), so every
    micro-batch stays spread over all devices and splitting moves no data."""

    def split(x: jax.Array) -> jax.Array:
        m = x.shape[0] // (shards * k)
        x = jnp.swapaxes(x.reshape(shards, k, m, *x.shape[1:]), 0, 1)
        return x.reshape(k, shards * m, *x.shape[3:])

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: Callable[[Any], jax.Array],
    config: Any,
    mesh: Mesh | None = None,
    teacher: distill.TeacherSetup | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """The (unjitted) step ``(state, batch[, teacher_params]) -> (state, metrics)``: loss, grads, AdamW, EMA;
    metrics are float32 scalars. With a ``teacher`` (pi-Flow distillation) the step takes the teacher's
    weights as a third argument and minimises the pi-ID loss.

    With ``config.grad_accum_steps = k > 1`` the global batch is split into ``k`` micro-batches
    (``micro_batches``, laid out over ``mesh``'s devices; ``None``: one device) that a ``lax.scan`` runs one
    after another, summing gradients, loss and metrics; their means then make one optimizer step (clip,
    AdamW, schedule, EMA), as one step at the whole batch would.
    """
    nan_at = int(config.debug.nan_at_step)
    batch_size = int(config.batch_size)
    accum = int(config.grad_accum_steps)
    shards = 1 if mesh is None else mesh.size
    micro_sharding = None if mesh is None else NamedSharding(mesh, P(None, MESH_AXES))

    def loss_and_grads(params: Params, batch: Batch, key: jax.Array, objective: Any) -> tuple:
        index = batch["index"]
        batch = {k: v for k, v in batch.items() if k != "index"}
        grad_fn = jax.value_and_grad(lambda p: loss_fn(graphdef, p, batch, key, config, index, objective), has_aux=True)
        return grad_fn(params)

    def accumulated(params: Params, batch: Batch, key: jax.Array, objective: Any) -> tuple:
        batch = dict(batch, index=jnp.arange(batch["label"].shape[0], dtype=jnp.int32))
        if accum == 1:
            return loss_and_grads(params, batch, key, objective)
        micro = micro_batches(batch, accum, shards)
        if micro_sharding is not None:
            micro = jax.lax.with_sharding_constraint(micro, jax.tree.map(lambda _: micro_sharding, micro))

        def body(total, one):
            out = loss_and_grads(params, one, key, objective)
            return jax.tree.map(jnp.add, total, out), None

        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(lambda p, b, k: loss_and_grads(p, b, k, objective), params, first, key)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        total, _ = jax.lax.scan(body, zeros, micro)
        return jax.tree.map(lambda x: x / accum, total)

    def step_fn(state: TrainState, batch: Batch, teacher_params: Any = None) -> tuple[TrainState, Metrics]:
        key = jax.random.fold_in(state.rng, state.step)
        objective = None
        if teacher is not None:
            teacher_fn = distill.teacher_velocity(teacher, teacher_params, config.distill)
            objective = (teacher_fn, distill.teacher_ratio_at(state.step, config.distill))
        (loss, aux), grads = accumulated(state.params, batch, key, objective)
        if nan_at >= 0:  # debug: poison this step (loss and grads), as a diverged step would be
            poison = jnp.where(state.step == nan_at, jnp.nan, 1.0)
            loss = loss * poison
            grads = jax.tree.map(lambda g: g * poison, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        beta = ema_beta_for(state.step, batch_size, config.ema)
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


StepFn = Callable[..., tuple[TrainState, Metrics]]


# XLA's TPU options that keep FSDP's all-gather / reduce-scatter + matmul pairs out of windowed-einsum loops.
NO_WINDOWED_EINSUM = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def compiler_options(config: Any, mesh: Mesh) -> dict[str, bool] | None:
    """The XLA options the step's programs compile with: ``NO_WINDOWED_EINSUM`` for a TPU mesh when
    ``config.windowed_einsum`` is False, else None (XLA's defaults)."""
    if config.windowed_einsum or mesh.devices.flat[0].platform != "tpu":
        return None
    return dict(NO_WINDOWED_EINSUM)


def jit_train_step(config: Any, setup: StateSetup, mesh: Mesh, teacher: distill.TeacherSetup | None = None) -> StepFn:
    """The trainer's compiled step: state sharded as ``setup``, batch split over the whole mesh, the
    teacher's weights (distillation) as ``teacher.abstract``, the state donated; metrics replicated;
    ``compiler_options``. The ahead-of-time compile (``gmflow_jax.aot``) lowers this same one."""
    in_shardings = (setup.shardings, batch_spec_sharding(mesh))
    if teacher is not None:
        in_shardings += (jax.tree.map(lambda a: a.sharding, teacher.abstract),)
    return jax.jit(
        make_train_step(setup.graphdef, setup.tx, setup.schedule, config, mesh, teacher),
        in_shardings=in_shardings,
        out_shardings=(setup.shardings, replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options(config, mesh),
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


def step_arguments(config: Any, setup: StateSetup, mesh: Mesh, teacher: distill.TeacherSetup | None = None) -> tuple:
    """The step's arguments as shapes: state, batch and (distillation) the teacher's weights."""
    args = (setup.abstract, abstract_batch(config, mesh))
    return args if teacher is None else (*args, teacher.abstract)


def compiled_train_step(
    config: Any, setup: StateSetup, mesh: Mesh, teacher: distill.TeacherSetup | None = None
) -> StepFn:
    """``jit_train_step``, compiled now from shapes alone (``step_arguments``); calling it with a real
    state and batch does not compile again. The trainer compiles before it creates or restores the
    state, so that the compiler's transient memory is not on top of it."""
    step_fn = jit_train_step(config, setup, mesh, teacher)
    step_fn.lower(*step_arguments(config, setup, mesh, teacher)).compile()
    return step_fn
