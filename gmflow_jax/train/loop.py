"""The training loop: ``train(config, workdir)`` (command line: ``python -m gmflow_jax.train``).

One run: validate the config (field-naming ``ValueError`` before anything compiles), build the
``('data', 'fsdp')`` mesh, write the resolved config into the workdir, create the state sharded
(or resume from the workdir's newest good checkpoint, or take weights from ``config.init_from``),
then loop: next global batch → jitted, state-donating train step → the *previous* step's metrics
read on the host (so the device never waits) → periodic scalars, progress, EMA sample grids and
async checkpoints. A non-finite loss / gradient / parameter norm stops with ``TrainingError``
naming the step; nothing with NaN weights is ever saved (metrics are checked before every save).
SIGTERM / SIGINT save the current step, wait for it and return normally (exit 0). Every write into the
workdir after start-up is fenced by the workdir's lock (``train.fence``): a run whose lock was taken
over, removed or whose lease ran out stops at the next agreed step boundary with ``LockLostError``,
saving nothing more.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from gmflow_jax import checkpoint as ckpt_lib
from gmflow_jax import storage
from gmflow_jax.data import load_source
from gmflow_jax.models.factory import data_shape
from gmflow_jax.multihost import agree, barrier, primary_first
from gmflow_jax.sharding import make_mesh
from gmflow_jax.train.config import resolve_data_dir, validate_config, write_config
from gmflow_jax.train.data import check_data, make_data_iterator
from gmflow_jax.train.distill import (
    TeacherSetup,
    fresh_tensors,
    load_teacher,
    setup_teacher,
    student_from_teacher,
)
from gmflow_jax.train.distill import flops_per_example as distill_flops_per_example
from gmflow_jax.train.fence import Fence, StopRequest
from gmflow_jax.train.lock import LOCK_FILE, LockLostError, WorkdirLock, WorkdirLockedError
from gmflow_jax.train.memory import return_freed_memory
from gmflow_jax.train.preview import make_preview_fn
from gmflow_jax.train.state import StateSetup, TrainState, init_state, setup_state
from gmflow_jax.train.step import StepFn, compiled_train_step
from gmflow_jax.train.writers import create_writer, import_clu
from gmflow_jax.utilization import ThroughputMeter, chip_for, train_flops_per_example
from gmflow_jax.viz import render, save_png

STUDENT_INIT_OFFSET = 0x71F  # the offsets nudging a student's tiled GM means apart
PREVIEW_SEED_OFFSET = 0x5A3  # the preview noise is the same at every step: samples are comparable


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss)."""


# --- set-up helpers --------------------------------------------------------------------


def host_value(x: jax.Array) -> np.ndarray:
    """A replicated (possibly multi-process) array on the host."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def check_devices(config: ml_collections.ConfigDict, n_dev: int | None = None, n_proc: int | None = None) -> None:
    """``ValueError`` naming ``config.batch_size`` unless it splits over the devices and processes (default:
    this run's), or naming ``config.grad_accum_steps`` unless it divides the per-device batch."""
    n_dev = jax.device_count() if n_dev is None else n_dev
    n_proc = jax.process_count() if n_proc is None else n_proc
    if config.batch_size % n_dev or config.batch_size % n_proc:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be divisible by the {n_dev} devices "
            f"(and {n_proc} processes); expected a multiple of {math.lcm(n_dev, n_proc)}."
        )
    k, per_device = config.grad_accum_steps, config.batch_size // n_dev
    if not isinstance(k, int) or k < 1 or per_device % k:
        raise ValueError(
            f"config.grad_accum_steps={k} must divide the per-device batch {per_device} "
            f"(config.batch_size={config.batch_size} over {n_dev} devices) into equal micro-batches."
        )


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``{'optim.lr': 2e-4, ...}``: scalars as they are, anything else as its string."""
    flat = ckpt_lib.flat_dict(config.to_dict())
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}


def finite_check(setup: StateSetup) -> Any:
    """``state dict -> problem or None``: params and EMA must be finite."""
    fn = jax.jit(
        lambda p, e: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((p, e))])),
        out_shardings=setup.shardings.step,
    )

    def check(state: dict[str, Any]) -> str | None:
        return None if bool(host_value(fn(state["params"], state["ema"]))) else "non-finite weights"

    return check


# --- the loop --------------------------------------------------------------------------


def train(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, restart_from_scratch: bool = False
) -> TrainState:
    """Trains (or resumes) the run in ``workdir`` up to ``config.num_steps``; returns the final state.

    Returns early, after saving, when SIGTERM/SIGINT arrives (also during set-up or compilation).
    Raises ``ValueError`` for a bad config (before anything compiles), ``WorkdirLockedError`` if
    another trainer holds ``workdir``, ``CheckpointError`` if checkpoints exist but none fits or
    restores (nothing is changed for a config that does not fit), or if the workdir once held
    checkpoints and none is left: it never silently starts over. ``restart_from_scratch`` moves
    everything in the workdir to ``replaced_runs/<time>/`` first and trains from step 0.
    ``TrainingError`` for a non-finite loss.
    """
    validate_config(config)
    mesh = make_mesh(config.mesh)
    check_devices(config)
    workdir = storage.workdir_path(workdir)  # local, file:// or gs://
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} is a file; expected a directory (it is created if missing).")
    data_dir = resolve_data_dir(config.data.data_dir)
    source = primary_first(lambda: load_source(config.data.dataset, data_dir), "gmflow_load_source")
    check_data(config, source, workdir)
    teacher = setup_teacher(config, mesh)  # distillation: checked before anything in the workdir changes
    workdir.mkdir(parents=True, exist_ok=True)
    with _hold_workdir(workdir, config.checkpoint.lock_lease_seconds) as fence:
        if restart_from_scratch and jax.process_index() == 0:
            moved = ckpt_lib.set_aside(workdir, keep=(LOCK_FILE,))
            if moved:
                logging.warning("--restart_from_scratch: the previous run's files were moved to %s", moved)
        barrier("gmflow_set_aside")
        _refuse_fresh_start_in_used_workdir(workdir)  # early, before orbax starts its threads
        logging.info(
            "mesh %s over %d devices in %d processes; dataset %s (%d examples) from %s",
            dict(mesh.shape),
            jax.device_count(),
            jax.process_count(),
            config.data.dataset,
            len(source),
            data_dir,
        )
        with StopRequest(config.checkpoint.preemption_check_every, fence) as stop:
            setup = setup_state(config, mesh)
            logging.info("model: %s parameters", f"{setup.num_params():,}")
            _refuse_another_models_checkpoint(config, setup, workdir)
            step_fn = _compile_step(config, setup, mesh, teacher)
            iterator = make_data_iterator(config, source, mesh, data_dir)
            ckpt = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
            lost = False
            try:
                teacher_params = None if teacher is None else load_teacher(teacher)
                state, resumed = _initial_state(config, setup, iterator, ckpt, teacher, teacher_params)
                return_freed_memory()  # the initialisation's or the restore's temporaries
                if teacher is not None:
                    compiled, step_fn = step_fn, lambda s, b: compiled(s, b, teacher_params)
                if jax.process_index() == 0 and fence.may_write("config.json"):
                    write_config(config, workdir)  # only once the run is known to fit the workdir
                return _loop(
                    config, workdir, mesh, setup, step_fn, iterator, ckpt, state, resumed, stop, fence, teacher
                )
            except LockLostError:
                lost = True
                raise
            finally:
                try:
                    ckpt.abandon() if lost else ckpt.close()  # a lost lock: no manifest written
                finally:
                    iterator.close()


@contextlib.contextmanager
def _hold_workdir(workdir: epath.Path, lease_s: float) -> Iterator[Fence]:
    """The workdir lock, held by process 0 for all processes; yields the ``Fence`` of their writes."""
    lock, error = None, None
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir, lease_s)
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            lock, error = None, e
    if not agree(error is None):
        raise error or WorkdirLockedError(f"process 0 could not lock the workdir {workdir}")
    try:
        yield Fence(lock, lease_s)
    finally:
        if lock is not None:
            lock.release()


def _refuse_fresh_start_in_used_workdir(workdir: epath.Path) -> None:
    """``CheckpointError`` if ``workdir`` once held checkpoints but has none to resume from."""
    if not ckpt_lib.list_steps(workdir / ckpt_lib.CHECKPOINT_DIR) and ckpt_lib.once_held_checkpoints(workdir):
        raise ckpt_lib.CheckpointError(
            f"{workdir} held checkpoints before (see {ckpt_lib.DAMAGED_DIR}/ and {ckpt_lib.MANIFEST_DIR}/) "
            "but has none left to resume from; refusing to start over from step 0. Pass --restart_from_scratch "
            "to set the old files aside and start a new run here, or use a new --workdir."
        )


def _refuse_another_models_checkpoint(config: ml_collections.ConfigDict, setup: StateSetup, workdir) -> None:
    """``IncompatibleCheckpointError`` before the compile (on every process alike) when the workdir's newest
    intact checkpoint was written by another model; the restore checks each step again."""
    error = None
    try:
        config_dict = json.loads(config.to_json_best_effort())
        ckpt_lib.check_resumable(workdir / ckpt_lib.CHECKPOINT_DIR, setup.abstract.to_dict(), config_dict)
    except ckpt_lib.IncompatibleCheckpointError as e:
        error = e
    if not agree(error is None):
        raise error or ckpt_lib.IncompatibleCheckpointError(
            f"another process found a checkpoint of another model in {workdir}; nothing was changed."
        )


def _compile_step(
    config: ml_collections.ConfigDict, setup: StateSetup, mesh: jax.sharding.Mesh, teacher: TeacherSetup | None
) -> StepFn:
    """The train step, compiled before any state exists: the compiler's transient memory is handed
    back before the state and the step's buffers are allocated (host memory, docs/performance.md)."""
    t0 = time.time()
    step_fn = compiled_train_step(config, setup, mesh, teacher)
    logging.info("compiled the train step in %.1f s", time.time() - t0)
    return_freed_memory()
    return step_fn


def _initial_state(
    config: ml_collections.ConfigDict,
    setup: StateSetup,
    iterator: Any,
    ckpt: ckpt_lib.Checkpointer,
    teacher: TeacherSetup | None = None,
    teacher_params: Any = None,
) -> tuple[TrainState, bool]:
    """The newest good checkpoint of the workdir (and the iterator moved to it), else a fresh state
    (a distilled student: started from the teacher's weights, ``distill.student_from_teacher``)."""
    config_dict = json.loads(config.to_json_best_effort())
    restored = ckpt.restore_latest(setup.abstract.to_dict(), iterator, finite_check(setup), config_dict)
    if restored is not None:
        step, state_dict = restored
        logging.info("resumed from %s at step %d", ckpt.directory, step)
        return TrainState.from_dict(state_dict), True
    _refuse_fresh_start_in_used_workdir(ckpt.workdir)
    state = init_state(setup, config.seed)
    if config.init_from:
        params, ema = ckpt_lib.load_weights(config.init_from, setup.abstract.params)
        state = state.replace(params=params, ema=ema)
        logging.info("initialised params and EMA from %s", config.init_from)
    elif teacher is not None:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), STUDENT_INIT_OFFSET)
        start = jax.jit(
            lambda s, t, k: student_from_teacher(config, s, teacher, t, k), out_shardings=setup.shardings.params
        )
        params = start(state.params, teacher_params, key)
        fresh = fresh_tensors(state.params, teacher_params)
        state = state.replace(params=params, ema=jax.tree.map(jnp.copy, params))
        logging.info(
            "student initialised from the teacher %s (GM head tiled %d -> %d Gaussians); fresh: %s",
            teacher.path,
            teacher.config.model.num_gaussians,
            config.model.num_gaussians,
            ", ".join(fresh) or "none",
        )
    return state, False


def _loop(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    mesh: jax.sharding.Mesh,
    setup: StateSetup,
    step_fn: StepFn,
    iterator: Any,
    ckpt: ckpt_lib.Checkpointer,
    state: TrainState,
    resumed: bool,
    stop: StopRequest,
    fence: Fence,
    teacher: TeacherSetup | None = None,
) -> TrainState:
    """The training loop from ``state`` to ``config.num_steps`` (or a stop signal)."""
    primary = jax.process_index() == 0
    writer = create_writer(str(workdir / "tensorboard"), primary=primary, may_flush=lambda: fence.may_write("events"))
    writer.write_hparams(flat_config(config))
    _, periodic_actions = import_clu()
    progress = periodic_actions.ReportProgress(
        num_train_steps=config.num_steps, writer=writer, every_steps=config.log.progress_every_steps, every_secs=None
    )
    hooks = [progress]
    if config.log.profile_first_step > 0:
        hooks.append(
            periodic_actions.Profile(
                logdir=str(workdir / "tensorboard"),
                num_profile_steps=config.log.profile_steps,
                profile_duration_ms=None,
                first_profile=config.log.profile_first_step,
                every_steps=None,
                every_secs=None,
            )
        )
    sampler = None
    if config.log.sample_every_steps > 0:
        sampler = make_preview_fn(config, mesh, data_shape(config.model))
    meta = {"config": json.loads(config.to_json_best_effort())}
    start = int(host_value(state.step))
    last_saved = start if resumed else -1

    # images/s, model TFLOP/s per device and MFU between log points (utilization.py)
    meter = ThroughputMeter(
        train_flops_per_example(config.model) if teacher is None else distill_flops_per_example(config, teacher),
        config.batch_size,
        jax.device_count(),
        chip_for(jax.devices()[0].device_kind),
    )

    def read_metrics(pending: tuple[int, dict[str, jax.Array]]) -> None:
        """Host read of a finished step's metrics; raises on non-finite values; logs periodically."""
        step, metrics = pending
        values = {
            k: float(v) for k, v in jax.device_get({k: v.addressable_data(0) for k, v in metrics.items()}).items()
        }
        bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(values[k])]
        if bad:
            raise TrainingError(
                f"non-finite {', '.join(bad)} at step {step} (loss={values['loss']}, grad_norm={values['grad_norm']}, "
                f"param_norm={values['param_norm']}); training stopped. The newest checkpoint "
                f"({'step ' + str(last_saved) if last_saved >= 0 else 'none'}) has finite weights."
            )
        if (step + 1) % config.log.every_steps == 0 or step + 1 == config.num_steps:
            writer.write_scalars(step + 1, dict(values, **(meter.update(step + 1, time.time()) or {})))

    def save(step: int, last: bool = False) -> None:
        nonlocal last_saved
        if step != last_saved and fence.may_save(step, last=last):
            ckpt.save(step, state.to_dict(), iterator.get_state(), dict(meta, step=step))
            last_saved = step

    def preview(step: int) -> None:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), PREVIEW_SEED_OFFSET)
        samples = host_value(sampler(state.ema, key))
        rows = min(config.log.sample_classes, config.model.num_classes) if samples.ndim == 4 else 1
        image = render(samples, rows)
        writer.write_images(step, {"ema_samples": image[None]})
        if primary and fence.may_write(f"preview of step {step}"):
            save_png(image, workdir / "samples" / f"step_{step:08d}.png")
            save_png(image, workdir / "samples" / "latest.png")

    pending = None
    step = start
    t0 = time.time()
    try:
        if start >= config.num_steps:
            logging.info("nothing to do: step %d >= config.num_steps=%d", start, config.num_steps)
        stopping = stop.should_stop(step)  # a signal during set-up or compilation
        while step < config.num_steps and not stopping:
            batch = next(iterator)
            state, metrics = step_fn(state, batch)
            if pending is not None:
                read_metrics(pending)  # the previous step: the device runs this one meanwhile
            pending = (step, metrics)
            ckpt.check_for_errors()  # a failed asynchronous save stops the run at the next step
            step += 1
            for hook in hooks:
                hook(step)
            stopping = stop.should_stop(step)
            if stopping or step % config.checkpoint.every_steps == 0 or step == config.num_steps:
                read_metrics(pending)  # never save weights of a step whose loss was not finite
                pending = None
                save(step, last=stopping or step == config.num_steps)
            every = config.log.sample_every_steps
            if sampler is not None and not stopping and (step % every == 0 or step == config.num_steps):
                with progress.timed("preview"):
                    preview(step)
        if pending is not None:
            read_metrics(pending)
        if stopping:
            save(step, last=True)
            logging.warning("stopped at step %d after a stop signal; checkpoint saved", step)
        ckpt.wait()
        logging.info("done: step %d, %.1f s in the loop", step, time.time() - t0)
    finally:
        if not fence.lost_here():  # a lost lock: nothing more written (the events of the last steps are dropped)
            writer.flush()
    return state
