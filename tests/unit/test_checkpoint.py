"""The checkpoint seam (``gmflow_jax.checkpoint``): steps written by ``Checkpointer`` and read back by the
read API that the trainer, the sampler and the tools share."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmflow_jax import checkpoint as ckpt
from gmflow_jax import recovery, storage


def state(step: int) -> dict:
    return {
        "step": jnp.int32(step),
        "params": {"w": jnp.full((3, 2), float(step)), "b": jnp.zeros((2,))},
        "ema": {"w": jnp.full((3, 2), step + 0.5), "b": jnp.ones((2,))},
        "opt_state": {"mu": jnp.zeros((3, 2))},
    }


@pytest.fixture
def workdir(tmp_path) -> str:
    """Steps 1, 2, 3 of a small state, saved synchronously with manifests; config.json beside them."""
    writer = ckpt.Checkpointer(str(tmp_path), keep=5, async_save=False)
    for step in (1, 2, 3):
        writer.save(step, state(step), b'{"pos": 0}', {"step": step, "config": {"model": {"depth": step}}})
    writer.close()
    (tmp_path / "config.json").write_text(json.dumps({"model": {"depth": 99}}))
    return str(tmp_path)


def test_list_steps_sees_only_committed_steps(workdir):
    directory = os.path.join(workdir, ckpt.CHECKPOINT_DIR)
    os.makedirs(os.path.join(directory, "4.orbax-checkpoint-tmp-17", "state"))  # a save in flight
    os.makedirs(os.path.join(directory, "5"))  # no state item
    assert ckpt.list_steps(directory) == [1, 2, 3]
    assert ckpt.list_steps(os.path.join(workdir, "nowhere")) == []


def test_locate_workdir_root_and_step_directory(workdir, tmp_path):
    directory = os.path.join(workdir, ckpt.CHECKPOINT_DIR)
    assert ckpt.locate(workdir) == (directory, None)
    assert ckpt.locate(directory) == (directory, None)
    assert ckpt.locate(os.path.join(directory, "2")) == (directory, 2)
    with pytest.raises(ckpt.CheckpointError, match="nowhere"):
        ckpt.locate(str(tmp_path / "nowhere"))


def test_verify_step_against_the_manifest(workdir):
    directory = os.path.join(workdir, ckpt.CHECKPOINT_DIR)
    assert ckpt.verify_step(directory, 3) is None
    files = sorted(p for p in (os.path.join(r, f) for r, _, fs in os.walk(os.path.join(directory, "3")) for f in fs))
    biggest = max(files, key=os.path.getsize)
    size = os.path.getsize(biggest)
    with open(biggest, "r+b") as f:
        f.truncate(size // 2)
    assert ckpt.verify_step(directory, 3) == f"file {os.path.relpath(biggest, os.path.join(directory, '3'))} " + (
        f"has {size // 2} bytes, expected {size}"
    )
    os.remove(files[0])
    assert ckpt.verify_step(directory, 3).endswith("is missing")
    os.remove(os.path.join(workdir, ckpt.MANIFEST_DIR, "2.json"))
    assert ckpt.verify_step(directory, 2) is None  # no manifest: nothing to compare (a warning)


def test_read_meta_and_fallback_to_config_json(workdir):
    directory = os.path.join(workdir, ckpt.CHECKPOINT_DIR)
    assert ckpt.read_meta(directory, 2) == {"step": 2, "config": {"model": {"depth": 2}}}
    os.remove(os.path.join(directory, "2", "meta", "metadata"))
    assert ckpt.read_meta(directory, 2)["config"] == {"model": {"depth": 99}}
    os.remove(os.path.join(workdir, "config.json"))
    with pytest.raises(ckpt.CheckpointError, match="has no config"):
        ckpt.read_meta(directory, 2)


def test_restore_part_or_all(workdir):
    directory = os.path.join(workdir, ckpt.CHECKPOINT_DIR)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state(0)["ema"])
    part = ckpt.restore(directory, 2, {"ema": abstract})
    assert set(part) == {"ema"}
    np.testing.assert_array_equal(part["ema"]["w"], np.full((3, 2), 2.5))
    whole = ckpt.restore(directory, 3)
    assert int(whole["step"]) == 3 and isinstance(whole["params"]["w"], np.ndarray)
    np.testing.assert_array_equal(whole["params"]["w"], np.full((3, 2), 3.0))


def test_newest_good_falls_back_and_reports(workdir):
    damaged = []

    def attempt(step: int) -> str:
        if step == 3:
            raise OSError("disk says no\nsecond line")
        return f"state {step}"

    found, problems = recovery.newest_good([1, 2, 3], attempt, lambda s, why: damaged.append((s, why)), where=workdir)
    assert found == (2, "state 2") and damaged == [(3, "OSError: disk says no")]
    assert problems == ["step 3: OSError: disk says no"]
    found, problems = recovery.newest_good([3], attempt, where=workdir)
    assert found is None and len(problems) == 1


def test_incompatible_and_transient_stop_the_search_without_damage(workdir):
    damaged = []

    def attempt(step: int) -> str:
        raise ckpt.IncompatibleCheckpointError(f"step {step} does not fit")

    with pytest.raises(ckpt.IncompatibleCheckpointError, match="step 3 does not fit"):
        recovery.newest_good([1, 2, 3], attempt, lambda s, why: damaged.append(s), where=workdir)
    assert damaged == []


def test_with_retries_retries_transient_errors_only():
    calls = []

    def flaky(step: int) -> str:
        calls.append(step)
        if len(calls) < 3:
            raise TimeoutError("storage timed out")
        return "ok"

    assert recovery.with_retries(flaky, delays=(0.0, 0.0, 0.0))(7) == "ok" and calls == [7, 7, 7]

    def down(step: int) -> str:
        raise ValueError("UNAVAILABLE: the bucket is unreachable")

    with pytest.raises(recovery.TransientCheckpointError, match="failed 3 times .*UNAVAILABLE.*nothing was changed"):
        recovery.with_retries(down, delays=(0.0, 0.0))(7)
    calls.clear()

    def broken(step: int) -> str:
        calls.append(step)
        raise ValueError("FAILED_PRECONDITION: ZSTD_decompressStream() failed")

    with pytest.raises(ValueError, match="ZSTD"):
        recovery.with_retries(broken, delays=(0.0, 0.0))(7)
    assert calls == [7]  # damage is not retried


def test_check_compatible_names_the_config_fields(workdir):
    directory = os.path.join(workdir, ckpt.CHECKPOINT_DIR)
    same = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state(0))
    ckpt.check_compatible(directory, 2, same, {"model": {"depth": 2}})  # fits: no error
    wider = dict(same, params={"w": jax.ShapeDtypeStruct((4, 2), jnp.float32), "b": same["params"]["b"]})
    with pytest.raises(ckpt.IncompatibleCheckpointError) as info:
        ckpt.check_compatible(directory, 2, wider, {"model": {"depth": 5}})
    message = str(info.value)
    assert (
        "model.depth 2 → 5" in message and "params/w: (3, 2) → (4, 2)" in message and "Nothing was changed" in message
    )


def test_describe_reports_the_root_cause_in_one_line():
    try:
        try:
            raise ValueError("FAILED_PRECONDITION: " + "x" * 400 + " ZSTD_decompressStream() failed")
        except ValueError as inner:
            raise Exception("Encountered error while reading array index\nSee full details") from inner
    except Exception as e:
        line = storage.describe(e)
    assert line.startswith("ValueError: FAILED_PRECONDITION") and line.endswith("ZSTD_decompressStream() failed")
    assert " … " in line and "\n" not in line and len(line) < 330


def test_once_held_and_set_aside(workdir, tmp_path):
    assert ckpt.once_held_checkpoints(workdir)
    fresh = tmp_path / "fresh"
    writer = ckpt.Checkpointer(str(fresh), keep=2, async_save=False)
    writer.close()  # no save: the workdir never held a checkpoint
    assert not ckpt.once_held_checkpoints(str(fresh))
    moved = ckpt.set_aside(workdir, keep=("config.json",))
    assert sorted(os.listdir(workdir)) == ["config.json", ckpt.SET_ASIDE_DIR]
    assert ckpt.list_steps(os.path.join(moved, ckpt.CHECKPOINT_DIR)) == [1, 2, 3]
    assert not ckpt.once_held_checkpoints(workdir)


def test_a_weights_only_checkpoint_is_not_resumed(tmp_path):
    writer = ckpt.Checkpointer(str(tmp_path), keep=1, async_save=False)
    weights = {k: v for k, v in state(0).items() if k != "opt_state"}
    writer.save(0, weights, None, {"step": 0, "config": {}})  # as gmflow_jax.convert writes it
    writer.close()
    directory = os.path.join(tmp_path, ckpt.CHECKPOINT_DIR)
    full = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state(0))
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=r"holds weights only .*--config\.init_from"):
        ckpt.check_compatible(directory, 0, full, {})


def test_manifests_of_a_newer_trainer_are_never_pruned(tmp_path):
    """A trainer prunes the manifests of its own deleted steps only: one stopped for a while and taken over
    (docs/reliability.md) must not delete the manifests of the new holder's later steps when it resumes."""
    writer = ckpt.Checkpointer(str(tmp_path), keep=1, async_save=False)
    writer.save(1, state(1), b'{"pos": 0}', {"step": 1, "config": {}})
    manifests = tmp_path / ckpt.MANIFEST_DIR
    (manifests / "7.json").write_text("{}")  # the new holder's step 7 (its files elsewhere, or not yet listed)
    (manifests / "0.json").write_text("{}")  # an older step of this trainer's, deleted: pruned
    writer.save(2, state(2), b'{"pos": 0}', {"step": 2, "config": {}})  # keep=1: orbax deletes step 1
    writer.close()
    assert sorted(p.name for p in manifests.iterdir()) == ["2.json", "7.json"]
