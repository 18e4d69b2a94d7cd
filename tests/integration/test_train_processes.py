"""The trainer as real processes: sharding equivalence, crash/preemption/damage recovery, NaN guard, bad configs.

Each test spawns ``python -m gmflow_jax.train`` with a tiny model (a toy MLP on 64k checkerboard
points, or a one-block GM-DiT on the 8×8 digits) in a temporary workdir, with simulated CPU
devices set through ``XLA_FLAGS`` in the child's environment.
"""

from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from train_helpers import (
    DIT,
    DIT_FLAGS,
    TOY,
    TOY_FLAGS,
    checkpoint_steps,
    flat,
    load_state,
    run,
    start,
    train_cmd,
    two_processes,
    wait_for,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds")


def toy(workdir, data_dir, *flags):
    return train_cmd(TOY, workdir, data_dir, *TOY_FLAGS, *flags)


def dit(workdir, data_dir, *flags):
    return train_cmd(DIT, workdir, data_dir, *DIT_FLAGS, *flags)


def ok(result) -> str:
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def losses(output: str) -> dict[int, float]:
    """``{step: loss}`` from the console metric lines ``[step] ... loss=...``."""
    out = {}
    for m in re.finditer(r"\] \[(\d+)\] .*?\bloss=([-\d.e+naif]+)", output):
        out[int(m.group(1))] = float(m.group(2))
    return out


def assert_same_state(a: dict, b: dict, *, exact: bool, rtol: float = 2e-4, atol: float = 2e-5) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        if exact:
            assert np.array_equal(fa[k], fb[k]), k
        else:
            np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=atol, err_msg=k)


# --- configuration errors stop before compiling ----------------------------------------


@pytest.mark.parametrize(
    "flags,message",
    [
        (("--config.num_stepz=3",), r'Did you mean "num_steps"'),
        (("--config.num_steps=abc",), r"--config\.num_steps=abc"),
        (("--config.mesh=(3,1)",), r"config\.mesh=\(3, 1\) needs 3 devices but this run has 2"),
        (("--config.data.dataset=mnist",), r"config\.data\.dataset must be one of"),
        (("--config.batch_size=63",), r"config\.batch_size=63 must be divisible by the 2 devices"),
        (("--config.grad_accum_steps=64",), r"config\.grad_accum_steps=64 must divide the per-device batch 32 "),
        (("--config.model.channels=3",), r"config\.model\.channels describe examples of shape \(3,\)"),
    ],
)
def test_config_errors_stop_before_compiling(tmp_path, data_dir, flags, message):
    result = run(toy(tmp_path, data_dir, "--config.num_steps=5", *flags), devices=2)
    assert result.returncode != 0
    assert re.search(message, result.stdout), result.stdout[-3000:]
    assert not (tmp_path / "checkpoints").exists()


def test_missing_imagenet_dataset_is_explained(tmp_path, data_dir):
    result = run(train_cmd("configs/imagenet_gmdit_k8.py", tmp_path, data_dir))
    assert result.returncode == 1
    assert "dataset 'imagenet_latents' is not built in" in result.stdout and "build_imagenet" in result.stdout


def test_multihost_init_failure_is_an_error(tmp_path, data_dir):
    result = run(toy(tmp_path, data_dir, "--config.num_steps=5", "--multihost"))
    assert result.returncode == 1
    assert "jax.distributed.initialize failed" in result.stdout and "single-host" in result.stdout


# --- training runs -----------------------------------------------------------------------


def test_nan_loss_stops_naming_the_step_and_saves_no_nan(tmp_path, data_dir):
    # step 19 is the last step before the save at 20: its NaN weights must not be saved
    result = run(
        toy(
            tmp_path,
            data_dir,
            "--config.num_steps=40",
            "--config.checkpoint.every_steps=10",
            "--config.debug.nan_at_step=19",
        )
    )
    assert result.returncode == 1
    assert re.search(r"non-finite loss.* at step 19\b", result.stdout), result.stdout[-3000:]
    assert checkpoint_steps(tmp_path) == [10]
    assert all(np.isfinite(v).all() for v in flat(load_state(tmp_path)).values())


@pytest.mark.slow
@pytest.mark.parametrize("read", ["per_process", "device"])
def test_kill_9_then_resume_is_bit_identical(tmp_path, data_dir, read):
    steps = 120
    flags = (f"--config.num_steps={steps}", "--config.checkpoint.every_steps=20", f"--config.data.read={read}")
    ok(run(toy(tmp_path / "ref", data_dir, *flags)))

    proc = start(toy(tmp_path / "crash", data_dir, *flags), log=tmp_path / "crash.log")
    wait_for(lambda: len(checkpoint_steps(tmp_path / "crash")) >= 2, timeout=120, proc=proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    killed_at = checkpoint_steps(tmp_path / "crash")[-1]
    assert killed_at < steps, "the run finished before it was killed"

    out = ok(run(toy(tmp_path / "crash", data_dir, *flags)))
    resumed = int(re.search(r"resumed from .* at step (\d+)", out).group(1))
    assert resumed >= killed_at
    assert checkpoint_steps(tmp_path / "crash")[-1] == steps
    assert_same_state(load_state(tmp_path / "ref"), load_state(tmp_path / "crash"), exact=True)


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path, data_dir):
    log = tmp_path / "run.log"
    proc = start(
        toy(tmp_path / "w", data_dir, "--config.num_steps=1000000", "--config.checkpoint.every_steps=100000"), log=log
    )
    wait_for(lambda: "ema_beta=" in log.read_text(), timeout=120, proc=proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    stopped = int(re.search(r"stopped at step (\d+)", log.read_text()).group(1))
    assert checkpoint_steps(tmp_path / "w") == [stopped]
    assert int(load_state(tmp_path / "w")["step"]) == stopped


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_then_none_good_is_an_error(tmp_path, data_dir):
    flags = ("--config.num_steps=30", "--config.checkpoint.every_steps=10")
    good = tmp_path / "good"
    ok(run(toy(good, data_dir, *flags)))
    reference = load_state(good)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)

    # truncate the largest array file of the newest step
    files = [p for p in (good / "checkpoints" / "30" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    out = ok(run(toy(good, data_dir, *flags)))
    assert re.search(r"checkpoint step 30 .* is damaged \(file .* has \d+ bytes, expected \d+\)", out), out[-3000:]
    assert "resumed from" in out and "at step 20" in out
    assert (good / "damaged_checkpoints" / "30").is_dir()
    assert_same_state(reference, load_state(good), exact=True)  # retrained 20 -> 30 identically

    # without manifests (orbax's own checks): truncate one step, delete a file from the others;
    # nothing restores -> a clear error, no silent restart
    shutil.rmtree(broken / "checkpoint_manifests")
    newest = broken / "checkpoints" / "30" / "state" / biggest.relative_to(good / "checkpoints" / "30" / "state")
    newest.write_bytes(newest.read_bytes()[:100])
    for step in (10, 20):
        (broken / "checkpoints" / str(step) / "state" / "_METADATA").unlink()
    result = run(toy(broken, data_dir, *flags))
    assert result.returncode == 1
    assert "can be restored" in result.stdout and "Refusing to restart from scratch" in result.stdout
    assert checkpoint_steps(broken) == []


def test_init_from_loads_weights_only(tmp_path, data_dir):
    ok(run(toy(tmp_path / "a", data_dir, "--config.num_steps=10")))
    ok(
        run(
            toy(
                tmp_path / "b",
                data_dir,
                "--config.num_steps=1",
                "--config.optim.lr=1e-12",
                f"--config.init_from={tmp_path / 'a'}",
            )
        )
    )
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert int(b["step"]) == 1
    for k, v in flat(a["params"]).items():
        np.testing.assert_allclose(flat(b["params"])[k], v, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_fsdp_on_8_devices_matches_1_device(tmp_path, data_dir):
    flags = ("--config.num_steps=3", "--config.checkpoint.every_steps=3")
    one = ok(run(dit(tmp_path / "one", data_dir, *flags, "--config.log.sample_every_steps=3"), devices=1))
    fsdp = ok(
        run(dit(tmp_path / "fsdp", data_dir, *flags, "--config.mesh=(1,8)", "--config.sharding.embed=fsdp"), devices=8)
    )
    assert "'fsdp': 8" in fsdp
    l1, l8 = losses(one), losses(fsdp)
    assert sorted(l1) == [1, 2, 3] and sorted(l8) == [1, 2, 3]
    np.testing.assert_allclose([l8[s] for s in (1, 2, 3)], [l1[s] for s in (1, 2, 3)], rtol=1e-4, atol=1e-5)
    assert_same_state(load_state(tmp_path / "one"), load_state(tmp_path / "fsdp"), exact=False)
    # the 1-device run also wrote its config, TensorBoard events and an EMA sample grid
    assert (tmp_path / "one" / "config.json").exists() and (tmp_path / "one" / "config.yaml").exists()
    assert list((tmp_path / "one" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "one" / "samples" / "latest.png").exists()
    # throughput from the second log point on (the first interval holds the compile); no MFU on a CPU
    assert re.search(r"\[3\].*perf/images_per_sec=.*perf/tflops_per_device=", one), one[-3000:]
    assert not re.search(r"\[1\].*perf/", one) and "perf/mfu" not in one


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, data_dir):
    flags = (
        "--config.num_steps=3",
        "--config.checkpoint.every_steps=3",
        "--config.mesh=(2,2)",
        "--config.sharding.embed=fsdp",
    )
    single = ok(run(dit(tmp_path / "single", data_dir, *flags), devices=4))
    logs = two_processes(lambda *f: dit(tmp_path / "multi", data_dir, *flags, *f), tmp_path, "proc", devices=2)
    assert "in 2 processes" in logs[0]
    l1, l2 = losses(single), losses(logs[0])
    np.testing.assert_allclose([l2[s] for s in (1, 2, 3)], [l1[s] for s in (1, 2, 3)], rtol=1e-4, atol=1e-5)
    assert_same_state(load_state(tmp_path / "single"), load_state(tmp_path / "multi"), exact=False)


@pytest.mark.slow
def test_two_processes_per_process_data_checkpoint_and_resume(tmp_path, data_dir):
    """Each process reads its own grain shard; the per-process iterator states are saved and restored."""
    work = tmp_path / "w"
    flags = ("--config.checkpoint.every_steps=10", "--config.data.read=per_process")
    logs = two_processes(lambda *f: toy(work, data_dir, "--config.num_steps=20", *flags, *f), tmp_path, "a")
    assert "in 2 processes" in logs[0]
    assert sorted(p.name for p in (work / "checkpoints" / "20" / "data").glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    logs = two_processes(lambda *f: toy(work, data_dir, "--config.num_steps=30", *flags, *f), tmp_path, "b")
    assert all("resumed from" in log and "at step 20" in log for log in logs)
    assert checkpoint_steps(work) == [10, 20, 30]
