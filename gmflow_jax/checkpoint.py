"""Orbax checkpoints of the train state and the data-iterator position, with damage detection.

Layout under ``<workdir>``::

    checkpoints/<step>/state/     TrainState.to_dict(): step, params, ema, opt_state, rng (orbax PyTree)
    checkpoints/<step>/data/      grain iterator state, one JSON per JAX process
    checkpoints/<step>/meta/      JSON: {'step', 'config'}
    checkpoint_manifests/<step>.json   {relative path: size} of every file of that step
    damaged_checkpoints/<step>[.<time>]/ (+ .manifest.json, .reason.txt)   steps moved aside as damaged
    replaced_runs/<time>/         what ``set_aside`` moved out of the way (``--restart_from_scratch``)

A step counts only once orbax has committed it: locally orbax writes to a temporary directory and
renames it; on Google Cloud Storage (no rename) it writes ``<step>/commit_success.txt`` last, and
``list_steps`` requires that file there. So a half-written save is never taken for a checkpoint. The
manifest is written by process 0 once the save has finished; on restore it detects truncated or
deleted files.

Paths go through ``gmflow_jax.storage`` (local, ``file://`` or ``gs://``), so the same code runs on a
local disk and on GCS. Moving a step or a run aside is a rename locally and a copy of every file, then
a delete, on GCS (see docs/reliability.md for what that means when interrupted).

Restoring tells three failures apart and destroys nothing:

* *incompatible*: the step's parameter tree (shapes, dtypes, structure) is not the one the config
  builds. ``IncompatibleCheckpointError`` names the config fields that differ, before anything
  is read or written; every file stays where it is.
* *transient*: an I/O error that may pass (time-outs, unavailable storage). Retried with
  back-off; if it persists, ``TransientCheckpointError``, nothing moved.
* *damaged*: the files fail the manifest or cannot be read, or the weights are not finite. The
  step is moved to ``<workdir>/damaged_checkpoints/`` (with the reason beside it) and the
  previous step is tried. If none is left: ``CheckpointError``, never a silent fresh start.

Writing is ``Checkpointer`` (the trainer's). Reading is the functions below it, used by the trainer's
restore, ``init_from``, the ``Sampler`` and anything else that opens a run: ``locate`` (a workdir,
its ``checkpoints/`` root or one step directory), ``list_steps``, ``verify_step`` (the manifest
check), ``read_meta`` and ``restore`` (a partial PyTree restore of the ``state`` item). The three
failure kinds, the retries and ``newest_good`` (the newest step that passes a check, trying older ones)
are ``gmflow_jax.recovery``'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from gmflow_jax.multihost import barrier
from gmflow_jax.recovery import (
    CheckpointError,
    IncompatibleCheckpointError,
    newest_good,
    with_retries,
)
from gmflow_jax.storage import describe, file_sizes, is_url, move, workdir_path, write_atomic

CHECKPOINT_DIR = "checkpoints"
MANIFEST_DIR = "checkpoint_manifests"
DAMAGED_DIR = "damaged_checkpoints"


SET_ASIDE_DIR = "replaced_runs"
COMMIT_FILE = "commit_success.txt"  # orbax's mark of a committed step where it cannot rename (GCS)


class _IteratorSnapshot:
    """Frozen iterator position for grain's handler (the live iterator moves on after ``save``)."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite (one host read)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(jax.device_get(jnp.all(jnp.stack(leaves)))) if leaves else True


class Checkpointer:
    """Keep-last-N async checkpoints of ``(state dict, data iterator)`` in ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int, async_save: bool = True):
        self.workdir = workdir_path(workdir)
        self.directory = self.workdir / CHECKPOINT_DIR
        self.manifest_dir = self.workdir / MANIFEST_DIR
        self._keep = keep
        self._async = async_save
        self._unmanifested: list[int] = []
        self._newest_saved = -1  # a manifest above it is another trainer's (one that took the workdir over)
        self._failed = False
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

    def save(self, step: int, state: dict[str, Any], data_state: bytes | None, meta: dict[str, Any]) -> None:
        """Starts saving ``state`` (a pytree of jax.Arrays) at ``step``; returns once the arrays are copied.

        ``data_state``: the data iterator's position (None for a weights-only checkpoint, e.g. a
        converted published model)."""
        self._finish_previous()
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_state is not None:
            import grain  # the trainer's dependency: readers of checkpoints never import it

            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state))
        args = ocp.args.Composite(**items)
        self._mngr.save(step, args=args, force=True)
        self._unmanifested.append(step)
        self._newest_saved = max(self._newest_saved, step)
        if not self._async:
            self._finish_previous()

    def _finish_previous(self) -> None:
        """Waits for the save in flight and writes the manifests of finished steps (process 0)."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            self._save_failed(e)
        self.check_for_errors()
        if jax.process_index() == 0 and (self._unmanifested or self.manifest_dir.is_dir()):
            self.manifest_dir.mkdir(parents=True, exist_ok=True)
            present = set(list_steps(self.directory))
            for step in self._unmanifested:
                if step in present:
                    sizes = file_sizes(self.directory / str(step))
                    write_atomic(self.manifest_dir / f"{step}.json", json.dumps(sizes, indent=0, sort_keys=True))
            for path in list(self.manifest_dir.iterdir()):  # drop manifests of steps orbax has deleted
                stem = path.name.split(".")[0]
                # only this trainer's own: one stopped in here and woken after a takeover sees a stale `present`
                if stem.isdigit() and int(stem) not in present and int(stem) <= self._newest_saved:
                    path.unlink()
        self._unmanifested = []

    def wait(self) -> None:
        """Blocks until every started save is on disk (and its manifest written)."""
        self._finish_previous()

    def close(self) -> None:
        """Finishes the saves in flight (unless one has failed: then only shuts orbax down)."""
        try:
            if not self._failed:
                self._finish_previous()
        finally:
            with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
                self._mngr.close()

    def abandon(self) -> None:
        """Shuts down writing nothing more of its own (the workdir's lock was lost): no manifest is written. A save
        already in flight is still finished by orbax's commit thread (docs/reliability.md: the remaining window)."""
        self._unmanifested, self._failed = [], True
        with contextlib.suppress(Exception):
            self._mngr.close()

    # --- restoring ----------------------------------------------------------------------

    def restore_latest(
        self,
        abstract_state: dict[str, Any],
        data_iterator: Any,
        check: Callable[[dict[str, Any]], str | None],
        config: dict[str, Any],
    ) -> tuple[int, dict[str, Any]] | None:
        """Restores the newest good step into ``abstract_state``'s shardings and ``data_iterator``.

        ``check(state) -> problem or None`` vets a restored state (e.g. finite weights); ``config``
        (the run's config as a dict) names the differing fields when a step does not fit. Returns
        ``(step, state)``, or None when there is no checkpoint. Only damaged steps are moved aside;
        ``IncompatibleCheckpointError`` / ``TransientCheckpointError`` stop with every file in place.
        """
        import grain

        steps = list_steps(self.directory)
        if not steps:
            return None

        def attempt(step: int) -> dict[str, Any]:
            problem = verify_step(self.directory, step)
            if problem is not None:
                raise CheckpointError(problem)
            check_compatible(self.directory, step, abstract_state, config)
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)
            )
            with _quiet_async_read_errors():
                state = self._mngr.restore(step, args=args)["state"]
            problem = check(state)
            if problem is not None:
                raise CheckpointError(problem)
            return state

        found, problems = newest_good(
            steps, with_retries(attempt), self._quarantine, where=self.directory, all_processes=True
        )
        if found is not None:
            if problems:
                logging.warning("resumed from the previous good checkpoint, step %d", found[0])
            return found
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be restored ({'; '.join(problems)}); the damaged steps were "
            f"moved to {self.workdir / DAMAGED_DIR}. Refusing to restart from scratch: repair them, "
            "use a new --workdir, or pass --restart_from_scratch (sets the old files aside)."
        )

    def check_for_errors(self) -> None:
        """``CheckpointError`` now if an asynchronous save has failed (call it every step: it is cheap)."""
        try:
            self._mngr.check_for_errors()
        except Exception as e:
            self._save_failed(e)

    def _save_failed(self, e: Exception) -> None:
        self._failed = True
        steps = ", ".join(map(str, self._unmanifested)) or "?"
        raise CheckpointError(
            f"saving checkpoint step {steps} in {self.directory} failed ({describe(e)}); the run stopped, "
            f"the earlier steps {list_steps(self.directory)} are intact."
        ) from e

    def _quarantine(self, step: int, reason: str) -> None:
        """Moves a damaged step (and its manifest) out of orbax's directory, with the reason beside it."""
        if jax.process_index() == 0:
            dest = self.workdir / DAMAGED_DIR
            dest.mkdir(parents=True, exist_ok=True)
            name = str(step)
            if (dest / name).exists():  # damaged before: keep both
                name = f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
            move(self.directory / str(step), dest / name)
            manifest = self.manifest_dir / f"{step}.json"
            if manifest.exists():
                move(manifest, dest / f"{name}.manifest.json")
            (dest / f"{name}.reason.txt").write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {reason}\n")
        barrier(f"gmflow_quarantine_{step}")
        self._mngr.reload()


def once_held_checkpoints(workdir: str | os.PathLike) -> bool:
    """Whether a run in ``workdir`` ever completed a checkpoint (manifests, or steps moved aside as damaged)."""
    root = workdir_path(workdir)
    damaged = root / DAMAGED_DIR
    return (root / MANIFEST_DIR).is_dir() or bool(damaged.is_dir() and any(damaged.iterdir()))


def set_aside(workdir: str | os.PathLike, keep: tuple[str, ...] = ()) -> str | None:
    """Moves everything in ``workdir`` (but ``keep``) into ``<workdir>/replaced_runs/<time>/``; returns that
    folder, or None if there was nothing to move. Nothing is deleted."""
    root = workdir_path(workdir)
    names = [p.name for p in root.iterdir() if p.name not in (SET_ASIDE_DIR, *keep)] if root.is_dir() else []
    if not names:
        return None
    dest = root / SET_ASIDE_DIR / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        move(root / name, dest / name)
    return str(dest)


# --- reading ----------------------------------------------------------------------------


def locate(path: str | os.PathLike) -> tuple[str, int | None]:
    """``(checkpoint directory, pinned step or None)`` of a workdir, its ``checkpoints/`` root or a step directory
    (local, ``file://`` or ``gs://``; see ``workdir_path``).

    ``CheckpointError`` naming ``path`` if it does not exist.
    """
    p = workdir_path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {os.fspath(path)!r} does not exist (resolved to {p}).")
    if p.name.isdigit() and (p / "state").is_dir():
        return str(p.parent), int(p.name)
    if p.name == CHECKPOINT_DIR and not (p / CHECKPOINT_DIR).is_dir():
        return str(p), None
    return str(p / CHECKPOINT_DIR), None


def list_steps(directory: str | os.PathLike) -> list[int]:
    """Committed steps in a checkpoint directory, ascending: numbered directories holding ``state/`` (and, on
    an object store, orbax's ``commit_success.txt``).

    Orbax writes a step under a temporary name and renames it when complete (on GCS: writes the commit
    file last), so a half-written save is never listed. A missing directory has no steps.
    """
    root = workdir_path(directory)
    if not root.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in root.iterdir()
        if p.name.isdigit() and (p / "state").is_dir() and (not is_url(p) or (p / COMMIT_FILE).exists())
    )


def verify_step(directory: str | os.PathLike, step: int) -> str | None:
    """None if the files of ``step`` match its manifest, else what is wrong (no manifest: None, with a warning)."""
    root = workdir_path(directory)
    path = root.parent / MANIFEST_DIR / f"{step}.json"
    if not path.exists():
        logging.warning("checkpoint step %d has no manifest (the run stopped before writing it)", step)
        return None
    expected = json.loads(path.read_text())
    actual = file_sizes(root / str(step))
    for rel, size in sorted(expected.items()):
        if rel not in actual:
            return f"file {rel} is missing"
        if actual[rel] != size:
            return f"file {rel} has {actual[rel]} bytes, expected {size}"
    return None


def read_meta(directory: str | os.PathLike, step: int) -> dict[str, Any]:
    """``{'step', 'config'}`` of a step (its ``meta`` item, else the workdir's ``config.json``)."""
    root = workdir_path(directory)
    meta = root / str(step) / "meta" / "metadata"
    if meta.is_file():
        return json.loads(meta.read_text())
    config = root.parent / "config.json"
    if config.is_file():
        return {"step": step, "config": json.loads(config.read_text())}
    raise CheckpointError(f"checkpoint step {step} in {directory} has no config (looked at {meta} and {config}).")


def state_metadata(directory: str | os.PathLike, step: int) -> dict[str, Any]:
    """The stored tree of the ``state`` item of ``step``, leaves ``ArrayMetadata`` (shape, dtype); no array is read."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.metadata(workdir_path(directory) / str(step) / "state").tree
    finally:
        handler.close()


def restore(directory: str | os.PathLike, step: int, target: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``state`` item of ``step``: the entries of ``target`` (a sub-tree of the train state, e.g.
    ``{'ema': abstract params}``, leaves ``jax.ShapeDtypeStruct`` with shardings; the rest is not read),
    or with ``target=None`` the whole state as NumPy arrays (inspection, tests)."""
    path = workdir_path(directory) / str(step) / "state"
    with ocp.PyTreeCheckpointer() as ckptr:
        if target is None:
            tree = state_metadata(directory, step)
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        return ckptr.restore(
            path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        )


def _key(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def tree_signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{'params/net/head/kernel': (shape, dtype)}`` of the array leaves of a state tree (arrays,
    ShapeDtypeStructs or orbax metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_key(e) for e in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
        for path, leaf in leaves
        if hasattr(leaf, "shape")
    }


def flat_dict(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{'optim.lr': 2e-4, ...}`` of a nested dict."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 8) -> str:
    """``'model.hidden_size 32 → 64, ...'``: the fields that differ between two configs (as dicts)."""
    a, b = flat_dict(old), flat_dict(json.loads(json.dumps(new)))  # tuples -> lists, as stored
    changed = [
        f"{k} {a.get(k, '(none)')!r} → {b.get(k, '(none)')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(changed[:limit]) + more if changed else "no config field (the code that builds the model changed?)"


def check_compatible(directory: str, step: int, abstract_state: Any, config: dict[str, Any]) -> None:
    """``IncompatibleCheckpointError`` unless the stored tree of ``step`` has the leaves, shapes and dtypes of
    ``abstract_state``. Reads only metadata."""
    stored = tree_signature(state_metadata(directory, step))
    wanted = tree_signature(abstract_state)
    if stored == wanted:
        return
    diffs = [
        f"{k}: {stored[k][0] if k in stored else 'absent'} → {wanted[k][0] if k in wanted else 'absent'}"
        for k in sorted(set(stored) | set(wanted))
        if stored.get(k) != wanted.get(k)
    ]
    if "opt_state" not in {k.split("/")[0] for k in stored}:
        raise IncompatibleCheckpointError(
            f"checkpoint step {step} in {directory} holds weights only (a converted model), no optimizer state to "
            "resume from. Nothing was changed: start a new --workdir with --config.init_from pointing here."
        )
    try:
        changes = config_changes(read_meta(directory, step)["config"], config)
    except CheckpointError:
        changes = "the checkpoint has no config to compare"
    raise IncompatibleCheckpointError(
        f"checkpoint step {step} in {directory} was written by a different model ({changes}; e.g. {diffs[0]}). "
        "Nothing was changed: resume with the run's own config (its config.json), or use a new --workdir."
    )


def check_resumable(directory: str, abstract_state: Any, config: dict[str, Any]) -> None:
    """``IncompatibleCheckpointError`` when the newest intact step in ``directory`` was written by another
    model (``check_compatible``: metadata only). The trainer asks before it compiles its step, so a mistyped
    flag costs seconds, not a compile; damaged or unreadable steps are left to ``restore_latest``."""
    for step in reversed(list_steps(directory)):
        if verify_step(directory, step) is None:
            try:
                check_compatible(directory, step, abstract_state, config)
            except IncompatibleCheckpointError:
                raise
            except Exception:  # noqa: BLE001 - unreadable metadata: restore_latest decides what it means
                pass
            return


@contextlib.contextmanager
def _quiet_async_read_errors() -> Iterator[None]:
    """Drops the echoes ('Event loop is closed', errors of abandoned coroutines) that a failed orbax
    restore leaves behind; the first error is raised normally."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not ("coroutine" in repr(unraisable.object) or "Event loop is closed" in str(unraisable.exc_value)):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        import gc

        gc.collect()  # finalise the abandoned coroutines while the hook is installed
        sys.unraisablehook = previous


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
