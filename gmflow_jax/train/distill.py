"""pi-Flow distillation in the trainer (docs/method.md §10): the frozen teacher, the student's start
from the teacher's weights, and the pi-ID objective the step minimises when ``config.distill.teacher``
is set.

The teacher is any workdir the Sampler reads (trained here or converted): the EMA weights of its
newest good step, loaded once, sharded by the student's rules (``config.sharding``) and passed to the
compiled step as an argument (not a constant of the program, not part of the checkpoint). The student
is the teacher's network (same kind, data shape, classes and trunk: width, depth, heads, patch) with
any number of Gaussians that the teacher's divides: a fresh student copies every tensor the two share and
tiles the teacher's GM head (each teacher component repeated ``K_student / K_teacher`` times with its
weight shared among the copies, so the student starts as the teacher's mixture), then nudges the
copies' means apart (the authors' ``GMDiTTransformer2DModelV2.init_weights``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from gmflow_jax import checkpoint as ckpt_lib
from gmflow_jax import piflow, recovery, storage
from gmflow_jax.flow import TAU_SCALE, to_tau
from gmflow_jax.gm import gm_mean
from gmflow_jax.models.factory import build_model, data_shape, split_params
from gmflow_jax.models.gmdit import DIT_SIZES
from gmflow_jax.sharding import batch_spec_sharding, check_rules, tree_shardings
from gmflow_jax.solvers import guidance_pairs, split_pairs
from gmflow_jax.utilization import gmdit_forward_flops

MEAN_NOISE = 0.05  # std of the per-component offsets added to the tiled means' bias (authors: 0.05)
FLOW_MATCHING_LOGSTD = math.log(0.05)  # a flow-matching teacher has no std: the student's starts here (authors)


class TeacherError(ValueError):
    """The teacher workdir is missing, damaged or does not match the student (one line)."""


@dataclasses.dataclass(frozen=True)
class TeacherSetup:
    """The frozen teacher: its run config, model graph and abstract (sharded) EMA weights."""

    path: str
    directory: str  # its checkpoint root
    step: int
    config: ml_collections.ConfigDict
    graphdef: nnx.GraphDef
    abstract: Any  # pure dict of jax.ShapeDtypeStruct with shardings

    @property
    def flow_matching(self) -> bool:
        """An L2 flow-matching teacher (its velocity: the mean; guidance: CFG), else a GMFlow teacher."""
        return self.config.loss.get("objective", "gm") == "l2"


def _trunk(mcfg: Any) -> dict[str, Any]:
    """The fields of ``config.model`` that fix the trunk's tensors (a standard ``arch`` resolved)."""
    if mcfg.kind == "toy":
        return {k: int(mcfg[k]) for k in ("hidden", "num_layers", "num_freqs")}
    if mcfg.get("arch"):
        size, patch = mcfg.arch.split("/")
        hidden, depth, heads = DIT_SIZES[size]
        out = dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=int(patch))
    else:
        out = {k: int(mcfg[k]) for k in ("hidden_size", "depth", "num_heads", "patch_size")}
    out["mlp_ratio"] = float(mcfg.mlp_ratio)
    out["time_scale"] = float(mcfg.get("time_scale", 1000.0))  # the time MLP's input scale (σ · time_scale)
    return out


def check_student(config: ml_collections.ConfigDict, teacher: ml_collections.ConfigDict, where: str) -> None:
    """``TeacherError`` naming the field unless the student (``config.model``) can start from the teacher."""
    s, t = config.model, teacher.model
    if t.get("kind") != s.kind:
        raise TeacherError(
            f"{where}: the teacher is a {t.get('kind')!r} model, config.model.kind={s.kind!r}; expected the same kind."
        )
    if data_shape(s) != data_shape(t):
        raise TeacherError(
            f"{where}: the teacher works on examples of shape {data_shape(t)}, config.model on {data_shape(s)}; "
            "expected the same data shape."
        )
    if int(s.num_classes) != int(t.num_classes):
        raise TeacherError(
            f"{where}: the teacher has {t.num_classes} classes, config.model.num_classes={s.num_classes}; "
            "expected the same classes."
        )
    st, tt = _trunk(s), _trunk(t)
    for field, value in st.items():
        if value != tt[field]:
            raise TeacherError(
                f"{where}: config.model cannot be initialised from the teacher: {field} {value} vs the teacher's "
                f"{tt[field]}; expected the teacher's trunk ({tt})."
            )
    if s.num_gaussians % t.num_gaussians:
        raise TeacherError(
            f"{where}: config.model.num_gaussians={s.num_gaussians} cannot be initialised from the teacher's "
            f"{t.num_gaussians} Gaussians; expected a multiple of {t.num_gaussians}."
        )


def _read_teacher(path: str) -> tuple[str, int, ml_collections.ConfigDict]:
    """``(checkpoint root, step, run config)`` of the newest good step of the teacher at ``path``."""
    where = f"config.distill.teacher={path!r}"
    try:
        directory, pinned = ckpt_lib.locate(path)
        steps = [pinned] if pinned is not None else ckpt_lib.list_steps(directory)
    except ckpt_lib.CheckpointError as e:
        raise TeacherError(f"{where}: {e}") from None
    if not steps:
        raise TeacherError(
            f"{where}: no checkpoint there (looked in {directory}); expected a trainer workdir or a converted one."
        )

    def attempt(step: int) -> ml_collections.ConfigDict:
        problem = ckpt_lib.verify_step(directory, step)
        if problem is not None:
            raise ckpt_lib.CheckpointError(problem)
        return ml_collections.ConfigDict(ckpt_lib.read_meta(directory, step)["config"])

    found, problems = recovery.newest_good(steps, attempt, where=where)
    if found is None:
        raise TeacherError(f"{where}: no usable checkpoint ({'; '.join(problems)}).")
    step, tconfig = found
    return str(directory), step, tconfig


def setup_teacher(config: ml_collections.ConfigDict, mesh: Mesh, *, shapes_only: bool = False) -> TeacherSetup | None:
    """The teacher of ``config.distill.teacher`` (None when unset), checked against the student; no weights
    read. ``shapes_only`` (the ahead-of-time compile): without a teacher workdir, the architecture of the
    packaged config ``distill.teacher_config`` (step -1, nothing to load)."""
    d = config.distill
    if d.teacher:
        directory, step, tconfig = _read_teacher(d.teacher)
        where = f"config.distill.teacher={d.teacher!r}"
    elif shapes_only and d.nfe > 0 and d.teacher_config:
        from gmflow_jax.train.config import load_config  # noqa: PLC0415 - config imports the trainer's modules

        directory, step, tconfig = "", -1, load_config(d.teacher_config)
        where = f"config.distill.teacher_config={d.teacher_config!r}"
    elif d.nfe > 0:
        raise TeacherError(
            f"config.distill.nfe={d.nfe} makes a pi-Flow student, which trains against a teacher: set "
            "--config.distill.teacher=TEACHER_WORKDIR" + (" (or distill.teacher_config)" if shapes_only else "") + "."
        )
    else:
        return None
    check_student(config, tconfig, where)
    if not model_has_classes(config) and d.guidance > 0:
        raise TeacherError(
            f"config.distill.guidance={d.guidance}: guidance needs a class-conditional teacher; {where} has no classes."
        )
    if tconfig.loss.get("objective", "gm") != "l2" and d.guidance >= 1:
        raise TeacherError(
            f"config.distill.guidance={d.guidance} is a CFG scale, but {where} is a GMFlow teacher: its guidance is "
            "probabilistic, w̃ in [0, 1) (e.g. 0.3)."
        )
    graphdef, abstract = split_params(nnx.eval_shape(lambda: build_model(tconfig.model, nnx.Rngs(0), remat=False)))
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
    abstract = nnx.to_pure_dict(abstract)
    shardings = tree_shardings(logical, abstract, check_rules(config.sharding), mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return TeacherSetup(d.teacher or d.teacher_config, directory, step, tconfig, graphdef, abstract)


def flops_per_example(config: ml_collections.ConfigDict, teacher: TeacherSetup) -> float | None:
    """Model FLOPs of one distillation example: the student's training (3× its forward) and the teacher's
    forwards at the ``num_intermediate_states`` (twice each when guided); None for uncounted models."""
    if config.model.kind != "gmdit":
        return None
    d = config.distill
    guided = d.guidance > 0 and not (teacher.flow_matching and d.guidance == 1.0)
    passes = d.num_intermediate_states * (2 if guided else 1)
    return 3.0 * gmdit_forward_flops(config.model) + passes * gmdit_forward_flops(teacher.config.model)


def load_teacher(teacher: TeacherSetup) -> Any:
    """The teacher's EMA weights, sharded as ``teacher.abstract``."""
    try:
        params = ckpt_lib.restore(teacher.directory, teacher.step, {"ema": teacher.abstract})["ema"]
    except Exception as e:  # noqa: BLE001 - one line naming the teacher
        raise TeacherError(
            f"config.distill.teacher={teacher.path!r}: could not load step {teacher.step} ({storage.describe(e)})."
        ) from e
    logging.info(
        "teacher: %s step %d (%s)", teacher.path, teacher.step, "flow matching" if teacher.flow_matching else "GMFlow"
    )
    return params


def teacher_velocity(teacher: TeacherSetup, params: Any, dcfg: Any) -> piflow.TeacherFn:
    """``teacher_fn(x, tau, labels) -> u``: a GMFlow teacher's probabilistically guided mean
    (``piflow.gmflow_teacher``, w̃ = ``dcfg.guidance``), or a flow-matching teacher's CFG
    ``u_u + w (u_c − u_u)`` (w = ``dcfg.guidance``; 0 or 1: the conditional velocity); guidance only where
    σ = τ/1000 lies in ``dcfg.guidance_interval``."""
    null = int(teacher.config.model.num_classes)
    lo, hi = (float(v) * TAU_SCALE for v in dcfg.guidance_interval)
    batch = batch_spec_sharding(jax.tree.leaves(teacher.abstract)[0].sharding.mesh)

    def net(x, tau, labels):
        # the states come from inside the policy's sub-step loop, where XLA loses their batch layout: unpinned,
        # it ran the teacher on the whole batch on every device, its activations summed over the FSDP shards
        x, tau, labels = (jax.lax.with_sharding_constraint(a, batch) for a in (x, tau, labels))
        return nnx.merge(teacher.graphdef, params).net(x, tau, labels)

    if not teacher.flow_matching:
        return piflow.gmflow_teacher(
            net,
            guidance=float(dcfg.guidance),
            null_label=null,
            orthogonal=float(dcfg.orthogonal),
            guidance_interval=(lo, hi),
        )
    w = float(dcfg.guidance)

    def cfg_teacher(x, tau, labels):
        if w in (0.0, 1.0):
            return gm_mean(net(x, tau, labels))
        both = net(guidance_pairs(x, x), guidance_pairs(tau, tau), guidance_pairs(labels, jnp.full_like(labels, null)))
        u_c, u_u = split_pairs(gm_mean(both))
        scale = jnp.where((tau >= lo) & (tau <= hi), w, 1.0).reshape((x.shape[0],) + (1,) * (x.ndim - 1))
        return u_u + scale * (u_c - u_u)

    return cfg_teacher


def _tile_head(a: jax.Array, p2: int, kt: int, ks: int, c: int, interleaved: bool = False) -> jax.Array:
    """GM-head outputs (..., p²·Kt·(C+1)) -> (..., p²·Ks·(C+1)): component j of the student is the
    teacher's ``j mod Kt`` (means and logit). GM-DiT orders a position's outputs as K·C means then K
    logits; the toy MLP (``interleaved``, p² = 1) as K blocks of C means and a logit."""
    lead = a.shape[:-1]
    if interleaved:
        a = a.reshape(*lead, kt, c + 1)
        return jnp.tile(a, (1,) * len(lead) + (ks // kt, 1)).reshape(*lead, ks * (c + 1))
    a = a.reshape(*lead, p2, kt * (c + 1))
    means = a[..., : kt * c].reshape(*lead, p2, kt, c)
    logits = a[..., kt * c :]
    r = ks // kt
    means = jnp.tile(means, (1,) * (len(lead) + 1) + (r, 1)).reshape(*lead, p2, ks * c)
    logits = jnp.tile(logits, (1,) * (len(lead) + 1) + (r,))
    return jnp.concatenate([means, logits], axis=-1).reshape(*lead, p2 * ks * (c + 1))


HEAD = "['net']['head']"  # the GM head's tensors: tiled from the teacher's when K differs


def _source(name: str, leaf: Any, other: Any) -> str:
    """Where a student tensor starts: 'copy' (the teacher's of the same path and shape), 'tile' (the GM head
    of another K) or 'fresh' (as initialised)."""
    if other is None:
        return "fresh"
    if other.shape == leaf.shape:
        return "copy"
    return "tile" if name.startswith(HEAD) else "fresh"


def _with_teacher(student: Any, teacher_params: Any, fn: Callable[[str, Any, Any], Any]) -> Any:
    """``fn(path name, student leaf, teacher leaf or None)`` over the student's tensors."""
    flat_t = dict(jax.tree_util.tree_flatten_with_path(teacher_params)[0])
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: fn(jax.tree_util.keystr(path), leaf, flat_t.get(path)), student
    )


def fresh_tensors(student: Any, teacher_params: Any) -> list[str]:
    """Paths of the student's tensors that ``student_from_teacher`` leaves as initialised."""
    kinds = _with_teacher(student, teacher_params, lambda name, leaf, other: (name, _source(name, leaf, other)))
    return [name for name, kind in jax.tree.leaves(kinds, is_leaf=lambda x: isinstance(x, tuple)) if kind == "fresh"]


def student_from_teacher(
    config: ml_collections.ConfigDict,
    student: Any,
    teacher: TeacherSetup,
    teacher_params: Any,
    key: jax.Array,
    mean_noise: float = MEAN_NOISE,
) -> Any:
    """A fresh student's params (pure dict) started from the teacher's (jittable; ``fresh_tensors`` lists
    what is not taken from the teacher).

    Shared tensors are copied; the GM head is tiled (``_tile_head``) with ``N(0, mean_noise²)`` offsets
    per component and channel on the means' bias (the same at every position of a patch); the log-std
    head is copied when its shapes match, and after a flow-matching teacher its output bias starts at
    log 0.05 (the authors' choice)."""
    s, t = config.model, teacher.config.model
    toy = s.kind == "toy"
    p2 = 1 if toy else _trunk(s)["patch_size"] ** 2
    kt, ks, c = int(t.num_gaussians), int(s.num_gaussians), data_shape(s)[-1]
    logstd_bias = "['net']['std_out']['bias']" if toy else "['net']['logstd_fc2']['bias']"

    def start(name: str, leaf: Any, other: Any) -> Any:
        if teacher.flow_matching and name == logstd_bias:
            return jnp.full_like(leaf, FLOW_MATCHING_LOGSTD)
        kind = _source(name, leaf, other)
        if kind == "copy":
            return jnp.asarray(other, leaf.dtype)
        if kind == "fresh":
            return leaf
        tiled = _tile_head(jnp.asarray(other, leaf.dtype), p2, kt, ks, c, interleaved=toy)
        if not name.endswith("['bias']"):
            return tiled
        noise = mean_noise * jax.random.normal(key, (ks, c), leaf.dtype)
        if toy:
            return tiled + jnp.concatenate([noise, jnp.zeros((ks, 1), leaf.dtype)], axis=-1).reshape(-1)
        return tiled + jnp.tile(jnp.concatenate([noise.reshape(-1), jnp.zeros((ks,), leaf.dtype)]), p2)

    return _with_teacher(student, teacher_params, start)


def piid_objective(
    model: Any,
    batch: dict[str, jax.Array],
    keys: jax.Array,
    config: Any,
    teacher_fn: piflow.TeacherFn,
    teacher_ratio: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """pi-ID loss (mean over the batch) and its terms: the student's GM at a segment start drawn per example
    (``piflow.segment_start``), imitated against ``teacher_fn`` along its own policy (``piflow.piid_loss``)."""
    d = config.distill
    x0 = batch["image"].astype(jnp.float32)
    labels = batch["label"].astype(jnp.int32) if model_has_classes(config) else None
    seg = piflow.segment_start(keys, x0, nfe=d.nfe, final_step_size_scale=d.final_step_size_scale, shift=d.shift)
    gm_u = model.net(seg.x_src, to_tau(seg.sigma_src), labels)
    per_example = piflow.piid_loss(
        keys,
        gm_u,
        seg.x_src,
        seg.t_src,
        seg.length,
        teacher_fn,
        labels,
        num_intermediate_states=d.num_intermediate_states,
        gm_dropout=d.gm_dropout,
        teacher_ratio=teacher_ratio,
        window_substeps=d.window_substeps,
        total_substeps=d.total_substeps,
        shift=d.shift,
        scale=d.scale,
    )
    loss = jnp.mean(per_example)
    return loss, {"loss_piid": loss, "logstd": jnp.mean(gm_u.logstds)}


def model_has_classes(config: Any) -> bool:
    """Whether the model takes class labels (a class-conditional GM-DiT; the toy MLP does not)."""
    return config.model.kind == "gmdit" and int(config.model.num_classes) > 0


def teacher_ratio_at(step: jax.Array, dcfg: Any) -> Any:
    """The teacher share of the intermediate states at ``step``: ``teacher_ratio`` decaying linearly to 0 over
    ``num_decay_iters`` steps (a Python 0.0 when it is 0 throughout, so the loss skips the rollout it needs)."""
    if float(dcfg.teacher_ratio) == 0.0:
        return 0.0
    if int(dcfg.num_decay_iters) <= 0:
        return float(dcfg.teacher_ratio)
    frac = jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / dcfg.num_decay_iters, 0.0, 1.0)
    return dcfg.teacher_ratio * frac
