"""Orbax checkpoints of the train state and the data-iterator position, with damage detection.

Layout under ``<workdir>``::

    checkpoints/<step>/state/     TrainState.to_dict(): step, params, ema, opt_state, rng (orbax PyTree)
    checkpoints/<step>/data/      grain iterator state, one JSON per JAX process
    checkpoints/<step>/meta/      JSON: {'step', 'config'}
    checkpoint_manifests/<step>.json   {relative path: size} of every file of that step

A step directory appears only once orbax has committed it (orbax writes to a temporary directory
and renames it), so a half-written save is never taken for a checkpoint. The manifest is written by
process 0 once the save has finished; on restore it detects truncated or deleted files. A step
that fails (manifest mismatch, restore error, non-finite weights) is moved to
``<workdir>/damaged_checkpoints/`` with a warning and the previous step is tried; if checkpoints
exist but none restores, ``CheckpointError`` — never a silent restart from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINT_DIR = "checkpoints"
MANIFEST_DIR = "checkpoint_manifests"
DAMAGED_DIR = "damaged_checkpoints"


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be restored, or a requested checkpoint is missing."""


class _IteratorSnapshot:
    """Frozen iterator position for grain's handler (the live iterator moves on after ``save``)."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


def _agree(ok: bool) -> bool:
    """True iff ``ok`` on every JAX process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def file_sizes(directory: str) -> dict[str, int]:
    """``{path relative to directory: size in bytes}`` of every file below ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = os.path.getsize(path)
    return out


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite (one host read)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(jax.device_get(jnp.all(jnp.stack(leaves)))) if leaves else True


class Checkpointer:
    """Keep-last-N async checkpoints of ``(state dict, data iterator)`` in ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
        self.manifest_dir = os.path.join(self.workdir, MANIFEST_DIR)
        self._keep = keep
        self._async = async_save
        self._unmanifested: list[int] = []
        self._mngr = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=self._async,
        )
        return ocp.CheckpointManager(self.directory, options=options)

    # --- saving -------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], data_state: bytes, meta: dict[str, Any]) -> None:
        """Starts saving ``state`` (a pytree of jax.Arrays) at ``step``; returns once the arrays are copied."""
        self._finish_previous()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state)),
            meta=ocp.args.JsonSave(meta),
        )
        self._mngr.save(step, args=args, force=True)
        self._unmanifested.append(step)
        if not self._async:
            self._finish_previous()

    def _finish_previous(self) -> None:
        """Waits for the save in flight and writes the manifests of finished steps (process 0)."""
        self._mngr.wait_until_finished()
        if jax.process_index() == 0:
            os.makedirs(self.manifest_dir, exist_ok=True)
            present = {int(n) for n in os.listdir(self.directory) if n.isdigit()}
            for step in self._unmanifested:
                if step in present:
                    sizes = file_sizes(os.path.join(self.directory, str(step)))
                    tmp = os.path.join(self.manifest_dir, f"{step}.json.tmp")
                    with open(tmp, "w") as f:
                        json.dump(sizes, f, indent=0, sort_keys=True)
                    os.replace(tmp, os.path.join(self.manifest_dir, f"{step}.json"))
            for name in os.listdir(self.manifest_dir):  # drop manifests of steps orbax has deleted
                stem = name.split(".")[0]
                if stem.isdigit() and int(stem) not in present:
                    os.remove(os.path.join(self.manifest_dir, name))
        self._unmanifested = []

    def wait(self) -> None:
        """Blocks until every started save is on disk (and its manifest written)."""
        self._finish_previous()

    def close(self) -> None:
        self._finish_previous()
        self._mngr.close()

    # --- restoring ----------------------------------------------------------------------

    def steps(self) -> list[int]:
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def verify_files(self, step: int) -> str | None:
        """None if the files of ``step`` match its manifest, else what is wrong (no manifest: None)."""
        path = os.path.join(self.manifest_dir, f"{step}.json")
        if not os.path.exists(path):
            logging.warning("checkpoint step %d has no manifest (the run stopped before writing it)", step)
            return None
        with open(path) as f:
            expected = json.load(f)
        actual = file_sizes(os.path.join(self.directory, str(step)))
        for rel, size in sorted(expected.items()):
            if rel not in actual:
                return f"file {rel} is missing"
            if actual[rel] != size:
                return f"file {rel} has {actual[rel]} bytes, expected {size}"
        return None

    def restore_latest(
        self, abstract_state: dict[str, Any], data_iterator: Any, check: Callable[[dict[str, Any]], str | None]
    ) -> tuple[int, dict[str, Any]] | None:
        """Restores the newest good step into ``abstract_state``'s shardings and ``data_iterator``.

        ``check(state) -> problem or None`` vets a restored state (e.g. finite weights). Returns
        ``(step, state)``, or None when there is no checkpoint. Damaged steps are moved aside.
        """
        steps = self.steps()
        if not steps:
            return None
        problems = []
        for step in reversed(steps):
            problem = self.verify_files(step)
            state = None
            if problem is None:
                try:
                    restored = self._mngr.restore(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract_state),
                            data=grain.checkpoint.CheckpointRestore(data_iterator),
                        ),
                    )
                    state = restored["state"]
                    problem = check(state)
                except Exception as e:  # any failure to read a step makes it damaged
                    problem = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            if not _agree(problem is None):
                problem = problem or "another process could not restore it"
            if problem is None:
                if problems:
                    logging.warning("resumed from the previous good checkpoint, step %d", step)
                return step, state
            logging.warning(
                "checkpoint step %d in %s is damaged (%s); trying the previous one", step, self.directory, problem
            )
            problems.append(f"step {step}: {problem}")
            self._quarantine(step)
        raise CheckpointError(
            f"checkpoints exist in {self.directory} but none can be restored ({'; '.join(problems)}); "
            f"they were moved to {os.path.join(self.workdir, DAMAGED_DIR)}. Refusing to restart from scratch: "
            "fix or remove them, or use a new workdir."
        )

    def _quarantine(self, step: int) -> None:
        """Moves a damaged step (and its manifest) out of orbax's directory."""
        if jax.process_index() == 0:
            dest = os.path.join(self.workdir, DAMAGED_DIR)
            os.makedirs(dest, exist_ok=True)
            target = os.path.join(dest, str(step))
            if os.path.exists(target):
                shutil.rmtree(target)
            shutil.move(os.path.join(self.directory, str(step)), target)
            manifest = os.path.join(self.manifest_dir, f"{step}.json")
            if os.path.exists(manifest):
                shutil.move(manifest, os.path.join(dest, f"{step}.manifest.json"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"gmflow_quarantine_{step}")
        self._mngr.reload()


def resolve_checkpoint_step_dir(path: str) -> str:
    """A step directory from ``path``: itself, or the latest step of a checkpoint root or workdir."""
    p = epath.Path(os.path.abspath(os.path.expanduser(path)))
    if (p / "state").is_dir():
        return os.fspath(p)
    for root in (p / CHECKPOINT_DIR, p):
        if root.is_dir():
            steps = [int(c.name) for c in root.iterdir() if c.name.isdigit() and (c / "state").is_dir()]
            if steps:
                return os.fspath(root / str(max(steps)))
    raise CheckpointError(
        f"config.init_from={path!r} is not a checkpoint: expected a step directory containing 'state/', "
        f"or a workdir / checkpoint root with numbered step directories."
    )


def load_weights(path: str, abstract_params: Any) -> tuple[Any, Any]:
    """``(params, ema)`` of the checkpoint at ``path`` (see ``resolve_checkpoint_step_dir``), sharded as
    ``abstract_params`` (ShapeDtypeStructs with shardings); optimizer state and step are not read."""
    step_dir = resolve_checkpoint_step_dir(path)
    target = {"params": abstract_params, "ema": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.PyTreeCheckpointer() as ckptr:
        try:
            out = ckptr.restore(
                os.path.join(step_dir, "state"),
                args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
            )
        except Exception as e:
            raise CheckpointError(
                f"config.init_from={path!r}: could not load params/ema from {step_dir} ({type(e).__name__}: {e}); "
                "expected a checkpoint of the same model architecture."
            ) from e
    return out["params"], out["ema"]
