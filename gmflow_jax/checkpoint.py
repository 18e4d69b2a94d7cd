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

Writing is ``Checkpointer`` (the trainer's). Reading is the functions below it, used by the trainer's
restore, ``init_from``, the ``Sampler`` and anything else that opens a run: ``locate`` (a workdir,
its ``checkpoints/`` root or one step directory), ``list_steps``, ``verify_step`` (the manifest
check), ``read_meta`` and ``restore`` (a partial PyTree restore of the ``state`` item), and
``newest_good`` (the newest step that passes a check, trying older ones).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from gmflow_jax.multihost import agree, barrier

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


def file_sizes(directory: str) -> dict[str, int]:
    """``{path relative to directory: size in bytes}`` of every file below ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = os.path.getsize(path)
    return out


def describe(e: BaseException) -> str:
    """How a failed step is reported: the first line of the message (at most 300 characters), after the
    exception's type unless it is our own ``CheckpointError``."""
    first = (str(e).splitlines() or [""])[0][:300]
    return first if isinstance(e, CheckpointError) else f"{type(e).__name__}: {first}"


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
        import grain  # the trainer's dependency: readers of checkpoints never import it

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
            present = set(list_steps(self.directory))
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

    def restore_latest(
        self, abstract_state: dict[str, Any], data_iterator: Any, check: Callable[[dict[str, Any]], str | None]
    ) -> tuple[int, dict[str, Any]] | None:
        """Restores the newest good step into ``abstract_state``'s shardings and ``data_iterator``.

        ``check(state) -> problem or None`` vets a restored state (e.g. finite weights). Returns
        ``(step, state)``, or None when there is no checkpoint. Damaged steps are moved aside.
        """
        import grain

        steps = list_steps(self.directory)
        if not steps:
            return None

        def attempt(step: int) -> dict[str, Any]:
            problem = verify_step(self.directory, step)
            if problem is not None:
                raise CheckpointError(problem)
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)
            )
            state = self._mngr.restore(step, args=args)["state"]
            problem = check(state)
            if problem is not None:
                raise CheckpointError(problem)
            return state

        found, problems = newest_good(steps, attempt, self._quarantine, where=self.directory, all_processes=True)
        if found is not None:
            if problems:
                logging.warning("resumed from the previous good checkpoint, step %d", found[0])
            return found
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
        barrier(f"gmflow_quarantine_{step}")
        self._mngr.reload()


# --- reading ----------------------------------------------------------------------------


def locate(path: str) -> tuple[str, int | None]:
    """``(checkpoint directory, pinned step or None)`` of a workdir, its ``checkpoints/`` root or a step directory.

    ``CheckpointError`` naming ``path`` if it does not exist.
    """
    p = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(p):
        raise CheckpointError(f"checkpoint path {path!r} does not exist (resolved to {p}).")
    name = os.path.basename(p)
    if name.isdigit() and os.path.isdir(os.path.join(p, "state")):
        return os.path.dirname(p), int(name)
    if name == CHECKPOINT_DIR and not os.path.isdir(os.path.join(p, CHECKPOINT_DIR)):
        return p, None
    return os.path.join(p, CHECKPOINT_DIR), None


def list_steps(directory: str) -> list[int]:
    """Committed steps in a checkpoint directory, ascending: numbered directories holding ``state/``.

    Orbax writes a step under a temporary name and renames it when complete, so a half-written
    save is never listed. A missing directory has no steps.
    """
    if not os.path.isdir(directory):
        return []
    names = os.listdir(directory)
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n, "state")))


def verify_step(directory: str, step: int) -> str | None:
    """None if the files of ``step`` match its manifest, else what is wrong (no manifest: None, with a warning)."""
    path = os.path.join(os.path.dirname(directory), MANIFEST_DIR, f"{step}.json")
    if not os.path.exists(path):
        logging.warning("checkpoint step %d has no manifest (the run stopped before writing it)", step)
        return None
    with open(path) as f:
        expected = json.load(f)
    actual = file_sizes(os.path.join(directory, str(step)))
    for rel, size in sorted(expected.items()):
        if rel not in actual:
            return f"file {rel} is missing"
        if actual[rel] != size:
            return f"file {rel} has {actual[rel]} bytes, expected {size}"
    return None


def read_meta(directory: str, step: int) -> dict[str, Any]:
    """``{'step', 'config'}`` of a step (its ``meta`` item, else the workdir's ``config.json``)."""
    meta = os.path.join(directory, str(step), "meta", "metadata")
    if os.path.isfile(meta):
        with open(meta) as f:
            return json.load(f)
    config = os.path.join(os.path.dirname(directory), "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            return {"step": step, "config": json.load(f)}
    raise CheckpointError(f"checkpoint step {step} in {directory} has no config (looked at {meta} and {config}).")


def restore(directory: str, step: int, target: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``state`` item of ``step``: the entries of ``target`` (a sub-tree of the train state, e.g.
    ``{'ema': abstract params}``, leaves ``jax.ShapeDtypeStruct`` with shardings; the rest is not read),
    or with ``target=None`` the whole state as NumPy arrays (inspection, tests)."""
    path = os.path.join(directory, str(step), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        if target is None:
            tree = ckptr.metadata(path).item_metadata.tree
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        return ckptr.restore(
            path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        )


def newest_good(
    steps: list[int],
    attempt: Callable[[int], Any],
    on_damaged: Callable[[int], None] | None = None,
    *,
    where: str,
    all_processes: bool = False,
) -> tuple[tuple[int, Any] | None, list[str]]:
    """Tries ``attempt(step)`` from the newest step down; returns ``((step, value) or None, problems)``.

    A step whose ``attempt`` raises is damaged: it is logged with its first error line, passed to
    ``on_damaged`` and the previous step is tried. With ``all_processes`` a step counts as good
    only if it is good on every JAX process.
    """
    problems = []
    for step in reversed(steps):
        value, problem = None, None
        try:
            value = attempt(step)
        except Exception as e:  # any failure to read a step makes it unusable
            problem = describe(e)
        if all_processes and not agree(problem is None):
            problem = problem or "another process could not restore it"
        if problem is None:
            return (step, value), problems
        logging.warning("checkpoint step %d in %s is damaged (%s); trying the previous one", step, where, problem)
        problems.append(f"step {step}: {problem}")
        if on_damaged is not None:
            on_damaged(step)
    return None, problems


def load_weights(path: str, abstract_params: Any) -> tuple[Any, Any]:
    """``(params, ema)`` of the newest step at ``path`` (a workdir, checkpoint root or step directory),
    sharded as ``abstract_params`` (ShapeDtypeStructs with shardings); optimizer state and step are not read."""
    try:
        directory, step = locate(path)
        steps = list_steps(directory)
        if step is None and not steps:
            raise CheckpointError(f"no checkpoint steps in {directory}")
        step = max(steps) if step is None else step
        out = restore(directory, step, {"params": abstract_params, "ema": abstract_params})
    except Exception as e:
        raise CheckpointError(
            f"config.init_from={path!r}: could not load params/ema ({describe(e)}); "
            "expected a workdir, checkpoint root or step directory of the same model architecture."
        ) from e
    return out["params"], out["ema"]
