"""Where the train step's time goes: its parts compiled one by one for the step's per-device shapes.

``compile_parts(config, devices)`` builds each part of the trainer's step as its own program, with the
step's mesh, parameter shardings and global batch (split over the whole mesh, as the step takes it), and
prices it with the same cost model as the whole step (``Compiled.estimated_seconds``: the TPU compiler's
``'optimal_seconds'``, custom calls it cannot price left out), with the step's XLA options. A GMFlow
step's parts:

* the network forward (listed for reference: the forward + backward contains it),
* the network forward + backward (the vector-Jacobian product of its GM output, remat policy included),
* the step's draws (per-example t, transition pair and label dropout),
* the GM loss (transition NLL and spectral loss, with their gradients with respect to the GM),
* the optimizer (clip, AdamW) and EMA update.

A pi-Flow distillation step's: the student's forward (reference) and forward + backward, the segment draws,
the teacher's forwards (one program, counted ``num_intermediate_states`` times), the policy rollouts with
the pi-ID loss and its gradient (one program, the teacher replaced by a free stand-in), and the optimizer and
EMA update. With ``grad_accum_steps = k`` all but the optimizer run ``k`` times at the micro-batch.
``breakdown_lines`` prints each part's predicted time and share of the whole step's, and the gap between
the parts' sum and the whole (fusion across parts, or work no part holds, e.g. the step's metrics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gmflow_jax.aot import STEP_LEVERS, StepReport, _compile, _ms
from gmflow_jax.aot.cost import Compiled
from gmflow_jax.flow import to_tau
from gmflow_jax.gm import GM
from gmflow_jax.models.factory import data_shape
from gmflow_jax.sharding import batch_spec_sharding, make_mesh, replicated

GAP_TOLERANCE = 0.15  # the parts' sum should be within this share of the whole step's prediction


@dataclasses.dataclass(frozen=True)
class Part:
    """One part of the step: its compiled program and how many times a step runs it."""

    name: str
    compiled: Compiled
    count: int = 1
    in_sum: bool = True  # False for a part another part contains (the forward)

    @property
    def seconds(self) -> float | None:
        t = self.compiled.estimated_seconds
        return None if t is None else t * self.count


def _shapes(tree: Any, sharding: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _part(name: str, fn: Callable[..., Any], args: tuple, options: Any, count: int = 1, in_sum: bool = True) -> Part:
    """``fn`` compiled for ``args`` with the step's XLA ``options`` (``train.step.compiler_options``)."""
    compiled = _compile(jax.jit(fn, compiler_options=options).lower(*args), name, STEP_LEVERS)
    return Part(name, Compiled.of(compiled), count, in_sum)


def _network_parts(
    graphdef: nnx.GraphDef, params: Any, inputs: tuple, what: str, count: int, options: Any
) -> list[Part]:
    """The forward and the forward + backward (a VJP of the GM output) of the model ``graphdef``'s network."""

    def forward(p, x, tau, labels):
        return tuple(nnx.merge(graphdef, p).net(x, tau, labels))

    gm = jax.eval_shape(forward, params, *inputs)
    cotangent = _shapes(gm, inputs[0].sharding)

    def forward_backward(p, cot, x, tau, labels):
        _, vjp = jax.vjp(lambda q: forward(q, x, tau, labels), p)
        return vjp(cot)[0]

    return [
        _part(f"{what} forward", forward, (params, *inputs), options, count, in_sum=False),
        _part(f"{what} forward + backward", forward_backward, (params, cotangent, *inputs), options, count),
    ]


def _optimizer_part(config: Any, setup: Any, options: Any) -> Part:
    """clip + AdamW + apply + EMA on the state's shardings (the gradients laid out like the parameters)."""
    from gmflow_jax.train.state import ema_update

    def update(params, ema, opt_state, grads, beta):
        updates, opt_state = setup.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, ema_update(ema, params, beta), opt_state

    s = setup.abstract
    beta = jax.ShapeDtypeStruct((), jnp.float32, sharding=s.step.sharding)
    return _part("optimizer + EMA update", update, (s.params, s.ema, s.opt_state, s.params, beta), options)


def compile_parts(config: Any, devices: Sequence[Any]) -> list[Part]:
    """The step's parts (module docstring) compiled for ``devices``; ``ValueError`` for a bad config."""
    from gmflow_jax.train.config import validate_config
    from gmflow_jax.train.distill import setup_teacher
    from gmflow_jax.train.state import setup_state
    from gmflow_jax.train.step import compiler_options

    validate_config(config)
    if config.model.kind != "gmdit":
        raise ValueError(f"the breakdown is for image models (config.model.kind='gmdit'); got {config.model.kind!r}.")
    mesh = make_mesh(config.mesh, devices=devices)
    setup = setup_state(config, mesh)
    teacher = setup_teacher(config, mesh, shapes_only=True)
    k = int(config.grad_accum_steps)
    n = int(config.batch_size) // k
    batch = batch_spec_sharding(mesh)
    x = jax.ShapeDtypeStruct((n, *data_shape(config.model)), jnp.float32, sharding=batch)
    vec = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=batch)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=batch)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated(mesh))
    params = setup.abstract.params
    what = "network" if teacher is None else "student"
    options = compiler_options(config, mesh)
    parts = _network_parts(setup.graphdef, params, (x, vec, labels), what, k, options)
    if teacher is None:
        parts += _gmflow_loss_parts(config, setup, params, x, vec, labels, key, k, options)
    else:
        parts += _distill_parts(config, setup, teacher, x, vec, labels, key, k, options)
    return [*parts, _optimizer_part(config, setup, options)]


def _gmflow_loss_parts(config, setup, params, x, vec, labels, key, k, options) -> list[Part]:
    """The step's draws and the GM loss with its gradient with respect to the GM (and the SpectrumMLP)."""
    from gmflow_jax.losses import sample_t, spectral_loss, transition_nll, transition_pair
    from gmflow_jax.randomness import example_keys, per_example
    from gmflow_jax.train.step import drop_labels, one_at_a_time

    lcfg, mcfg = config.loss, config.model

    def draws(key, x0, labels):
        keys = jax.vmap(lambda kk: jax.random.split(kk, 3))(example_keys(key, jnp.arange(x0.shape[0])))
        dropped = per_example(
            keys[:, 2], one_at_a_time(lambda kk, y: drop_labels(kk, y, mcfg.num_classes, lcfg.label_dropout)), labels
        )
        t = per_example(keys[:, 0], one_at_a_time(lambda kk: sample_t(kk, 1, mode=lcfg.t_mode, shift=lcfg.t_shift)))
        pair = per_example(
            keys[:, 1], one_at_a_time(lambda kk, xx, tt: transition_pair(kk, xx, tt, lcfg.trans_ratio)), x0, t
        )
        return (*pair, t, to_tau(t), dropped)

    def forward(p, xx, tau, lab):
        return tuple(nnx.merge(setup.graphdef, p).net(xx, tau, lab))

    gm = _shapes(jax.eval_shape(forward, params, x, vec, labels), x.sharding)

    def loss(gm_and_spectrum, all_params, x_t, x0, t, x_lo, t_lo):
        gm_arrays, spectrum = gm_and_spectrum
        gm_u = GM(*gm_arrays)
        total = lcfg.weight * jnp.mean(transition_nll(gm_u, x_t, t, x_lo, t_lo))
        if spectrum is not None and lcfg.spectral_weight > 0:  # the network's weights are not used
            model = nnx.merge(setup.graphdef, dict(all_params, spectrum=spectrum))
            total += lcfg.spectral_weight * jnp.mean(spectral_loss(gm_u, x_t, x0, t, model.spectrum))
        return total

    def gm_loss(all_params, gm_arrays, x_t, x0, t, x_lo, t_lo):
        differentiated = (gm_arrays, all_params.get("spectrum"))
        return jax.value_and_grad(loss)(differentiated, all_params, x_t, x0, t, x_lo, t_lo)

    return [
        _part("draws (t, transition pair, label dropout)", draws, (key, x, labels), options, k),
        _part("GM loss + its gradient", gm_loss, (params, gm, x, x, vec, x, vec), options, k),
    ]


def _distill_parts(config, setup, teacher, x, vec, labels, key, k, options) -> list[Part]:
    """The segment draws, the teacher's forwards and the policy rollouts with the pi-ID loss."""
    from gmflow_jax import piflow
    from gmflow_jax.randomness import example_keys
    from gmflow_jax.train.distill import teacher_velocity

    d = config.distill

    def draws(key, x0):
        seg = piflow.segment_start(
            example_keys(key, jnp.arange(x0.shape[0])),
            x0,
            nfe=d.nfe,
            final_step_size_scale=d.final_step_size_scale,
            shift=d.shift,
        )
        return tuple(seg)

    def teacher_forward(tparams, xx, tau, lab):
        return teacher_velocity(teacher, tparams, d)(xx, tau, lab)

    def forward(p, xx, tau, lab):
        return tuple(nnx.merge(setup.graphdef, p).net(xx, tau, lab))

    gm = _shapes(jax.eval_shape(forward, setup.abstract.params, x, vec, labels), x.sharding)

    def rollouts_and_loss(gm_arrays, key, x_src, t_src, length, lab):
        def loss(arrays):
            per_example = piflow.piid_loss(
                example_keys(key, jnp.arange(x_src.shape[0])),
                GM(*arrays),
                x_src,
                t_src,
                length,
                lambda xx, tau, lb: -xx,  # a free stand-in for the teacher (its forwards are a part of their own)
                lab,
                num_intermediate_states=d.num_intermediate_states,
                gm_dropout=d.gm_dropout,
                teacher_ratio=float(d.teacher_ratio),
                window_substeps=d.window_substeps,
                total_substeps=d.total_substeps,
                shift=d.shift,
                scale=d.scale,
            )
            return jnp.mean(per_example)

        return jax.value_and_grad(loss)(gm_arrays)

    return [
        _part("segment draws", draws, (key, x), options, k),
        _part(
            "teacher forward (one intermediate state)",
            teacher_forward,
            (teacher.abstract, x, vec, labels),
            options,
            k * int(d.num_intermediate_states),
        ),
        _part(
            "policy rollouts + pi-ID loss + its gradient", rollouts_and_loss, (gm, key, x, vec, vec, labels), options, k
        ),
    ]


def breakdown_lines(parts: Sequence[Part], step: StepReport) -> list[str]:
    """Each part's predicted time and share of the whole step's (fast end of its range), and the gap."""
    whole = None if step.predicted_seconds is None else step.predicted_seconds[0]
    lines = ["breakdown (each part compiled alone, same per-device shapes, same cost model):"]
    total = 0.0
    for part in parts:
        t = part.seconds
        if t is None:
            lines.append(f"  {part.name}: no estimate")
            continue
        if part.in_sum:
            total += t
        times = f" × {part.count}" if part.count > 1 else ""
        share = f", {100 * t / whole:.1f} % of the step" if whole else ""
        loops = f" ({part.compiled.loops} loops, bodies priced once)" if part.compiled.loops else ""
        ref = " [inside the next part]" if not part.in_sum else ""
        lines.append(f"  {part.name}{times}: {_ms(t)}{share}{loops}{ref}")
    if whole:
        gap = total / whole - 1.0
        verdict = "within" if abs(gap) <= GAP_TOLERANCE else "OUTSIDE"
        lines.append(
            f"  sum of the parts {_ms(total)} vs the whole step {_ms(whole)}: {100 * gap:+.1f} % ({verdict} "
            f"±{100 * GAP_TOLERANCE:.0f} %; a positive gap is fusion across parts, a negative one work no part "
            "holds, e.g. the step's metrics)"
        )
    return lines
