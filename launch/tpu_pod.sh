#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) it as a queued resource, copy the code onto every
# worker, install it, start the trainer on all workers at once (--multihost), stream worker 0's log,
# and re-create the slice and restart after a preemption (the trainer resumes from its workdir).
#
#   launch/tpu_pod.sh [--dry-run] --name NAME --accelerator TYPE --zone ZONE --workdir gs://BUCKET/RUN \
#       [--project P] [--spot] [--runtime-version V] [--repo URL --ref REF] [--env KEY=VALUE]... \
#       [--no-watch] [--poll SECONDS] [--max-restarts N] -- TRAINER_ARGS...
#   launch/tpu_pod.sh --watch  --name NAME --zone ZONE --accelerator TYPE --workdir ... -- TRAINER_ARGS...
#   launch/tpu_pod.sh --stop   --name NAME --zone ZONE     # SIGTERM to the trainers: they save and exit
#   launch/tpu_pod.sh --delete --name NAME --zone ZONE     # delete the queued resource and its slice
#
# TYPE: v5p-N, v4-N (N = TensorCores, 2 per chip, 4 chips per worker), v5litepod-N or v5e-N, v6e-N
# (N = chips; up to 8 chips on one worker, 4 chips per worker above that).
# Code: `git archive HEAD` of this checkout (committed files only) copied to every worker, or with
# --repo URL --ref REF a `git clone` on every worker. Install: `pip install '.[tpu,gcs]'` (README; gcs: gs:// workdirs) into
# ~/gmflow_venv, with python3.11 (installed with apt-get when the image lacks it; --remote-python).
# Start: on every worker (--worker=all), under nohup-like HUP immunity, from the home directory:
#   python -m gmflow_jax.train TRAINER_ARGS --multihost --workdir gs://BUCKET/RUN > ~/gmflow_train.log
# Watch (default; --no-watch returns after the start): worker 0's log streams here; every --poll
# seconds the queued resource's state is read; when it is SUSPENDED / FAILED or gone (preempted), it
# is deleted and re-created and the code copied, installed and started again, at most --max-restarts
# times. The run ends when worker 0's trainer exits (0: done). Ctrl-C leaves the run going.
# --dry-run prints the commands (one a line, shell-quoted; notes start with '#') and needs no gcloud.
# gcloud is ${GCLOUD:-gcloud}.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ && !/^#SBATCH/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
die() { printf 'launch/tpu_pod.sh: error: %s\n' "$*" >&2; exit 2; }

GCLOUD=${GCLOUD:-gcloud}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

action=run
dry_run=0
name=""
accelerator=""
zone=""
project=""
workdir=""
spot=0
runtime_version=""
repo_url=""
ref=""
remote_python=python3.11
remote_dir=gmflow_jax_src
venv=gmflow_venv
log=gmflow_train.log
poll=60
max_restarts=20
env_kv=()

need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --watch) action=watch ;;
        --no-watch) action=start ;;
        --stop) action=stop ;;
        --delete) action=delete ;;
        --spot | --preemptible) spot=1 ;;
        --name) need "$@"; name=$2; shift ;;
        --accelerator | --accelerator-type) need "$@"; accelerator=$2; shift ;;
        --zone) need "$@"; zone=$2; shift ;;
        --project) need "$@"; project=$2; shift ;;
        --workdir) need "$@"; workdir=$2; shift ;;
        --runtime-version) need "$@"; runtime_version=$2; shift ;;
        --repo) need "$@"; repo_url=$2; shift ;;
        --ref) need "$@"; ref=$2; shift ;;
        --remote-python) need "$@"; remote_python=$2; shift ;;
        --env) need "$@"; [[ $2 == [A-Za-z_]*=* ]] || die "--env takes KEY=VALUE, got '$2'"; env_kv+=("$2"); shift ;;
        --poll) need "$@"; poll=$2; shift ;;
        --max-restarts) need "$@"; max_restarts=$2; shift ;;
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (trainer flags go after --; see --help)" ;;
    esac
    shift
done
trainer_args=("$@")

[[ -n $name ]] || die "--name is required"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be lower-case letters, digits and '-', got '$name'"
[[ -n $zone ]] || die "--zone is required"
[[ $poll =~ ^[1-9][0-9]*$ ]] || die "--poll must be a positive number of seconds, got '$poll'"
[[ $max_restarts =~ ^[0-9]+$ ]] || die "--max-restarts must be a number, got '$max_restarts'"
[[ $remote_python =~ ^[A-Za-z0-9._/-]+$ ]] || die "--remote-python must be a plain command name, got '$remote_python'"
if [[ -n $repo_url ]]; then ref=${ref:-main}; elif [[ -n $ref ]]; then die "--ref needs --repo"; fi

# --- the accelerator: gcloud type, workers, devices, TPU software version ----------------------------
# Sources (Google Cloud TPU docs): "TPU v5p" (v5p-N: N TensorCores, 2 per chip, 4 chips per host,
# e.g. v5p-64 = 32 chips on 8 hosts), "TPU v4" (same counting), "TPU v5e" / "TPU v6e" (N = chips;
# single-host slices have up to 8 chips; multi-host slices are made of 4-chip TPU VMs, so
# v5litepod-256 has 64 workers), "TPU software versions" (runtimes.md: v5p v2-alpha-tpuv5, v5e
# v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e, v4 and earlier tpu-ubuntu2204-base).
accelerator_type=""
workers=0
chips=0
devices=0
describe_accelerator() {
    local family size
    accelerator_type=${accelerator/#v5e-/v5litepod-}
    family=${accelerator_type%-*}
    size=${accelerator_type##*-}
    [[ $size =~ ^[1-9][0-9]*$ && $family != "$accelerator_type" ]] ||
        die "--accelerator must look like v5p-64, v4-32, v5litepod-256 (v5e-256) or v6e-64, got '$accelerator'"
    case $family in
        v2 | v3)
            chips=$((size / 2)) devices=$size
            workers=$(((chips + 3) / 4)) default_runtime=tpu-ubuntu2204-base
            ;;
        v4 | v5p)
            chips=$((size / 2)) devices=$((size / 2)) # megacore: one JAX device per chip
            workers=$(((chips + 3) / 4))
            if [[ $family == v4 ]]; then default_runtime=tpu-ubuntu2204-base; else default_runtime=v2-alpha-tpuv5; fi
            ;;
        v5litepod | v6e)
            chips=$size devices=$size
            if ((size <= 8)); then workers=1; else workers=$((size / 4)); fi
            if [[ $family == v6e ]]; then default_runtime=v2-alpha-tpuv6e; else default_runtime=v2-alpha-tpuv5-lite; fi
            ;;
        *) die "unknown TPU generation '$family' in --accelerator '$accelerator' (v2, v3, v4, v5p, v5litepod/v5e, v6e)" ;;
    esac
    runtime_version=${runtime_version:-$default_runtime}
}

# --- printing and running ----------------------------------------------------------------------------
# One argument as the shell reads it back (like Python's shlex.quote).
quote() {
    if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}
quote_all() {
    local first=1 arg
    for arg in "$@"; do
        ((first)) || printf ' '
        first=0
        quote "$arg"
    done
}
note() {
    if ((dry_run)); then printf '# %s\n' "$*"; else printf '[tpu_pod %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; fi
}
# Runs a command, or prints it in a dry run.
run() {
    if ((dry_run)); then
        quote_all "$@"
        printf '\n'
    else
        "$@"
    fi
}
project_args=()
[[ -z $project ]] || project_args=(--project "$project")
qr() { run "$GCLOUD" compute tpus queued-resources "$1" "$name" "${@:2}" --zone "$zone" ${project_args[@]+"${project_args[@]}"}; }
ssh_on() { # ssh_on WORKER COMMAND
    run "$GCLOUD" compute tpus tpu-vm ssh "$name" --zone "$zone" ${project_args[@]+"${project_args[@]}"} "--worker=$1" --command "$2"
}

# Sets `state` to the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, FAILED, ...),
# MISSING when it does not exist, UNKNOWN when gcloud fails otherwise (network...). A dry run prints
# the command and assumes MISSING.
state=""
read_state() {
    local out
    if ((dry_run)); then
        qr describe --format='value(state.state)'
        state=MISSING
    elif out=$(qr describe --format='value(state.state)' 2>&1); then
        state=${out:-UNKNOWN}
    elif [[ $out == *NOT_FOUND* || $out == *"not found"* ]]; then
        state=MISSING
    else
        printf '%s\n' "$out" >&2
        state=UNKNOWN
    fi
}

create_slice() {
    local spot_args=()
    ((spot)) && spot_args=(--spot)
    note "creating queued resource $name: $accelerator_type ($chips chips, $workers workers), runtime $runtime_version$( ((spot)) && echo ', spot')"
    qr create --node-id "$name" --accelerator-type "$accelerator_type" --runtime-version "$runtime_version" ${spot_args[@]+"${spot_args[@]}"}
}
delete_slice() {
    note "deleting queued resource $name and its slice"
    qr delete --force --quiet
}
wait_active() {
    note "waiting for $name to become ACTIVE (polled every $poll s)"
    while true; do
        read_state
        ((dry_run)) && return 0
        case $state in
            ACTIVE) note "$name is ACTIVE"; return 0 ;;
            FAILED | SUSPENDED | MISSING) note "$name is $state while waiting for it"; return 1 ;;
            *) sleep "$poll" ;;
        esac
    done
}
wait_gone() {
    ((dry_run)) && return 0
    while read_state && [[ $state != MISSING ]]; do sleep "$poll"; done
}

# Ensures an ACTIVE slice: reuses an ACTIVE one, waits for one being provisioned, replaces a
# SUSPENDED / FAILED one, creates a missing one.
ensure_slice() {
    read_state
    case $state in
        ACTIVE) note "reusing the ACTIVE queued resource $name" ;;
        MISSING) create_slice ;;
        SUSPENDED | SUSPENDING | FAILED)
            note "queued resource $name is $state: replacing it"
            delete_slice || return
            wait_gone
            create_slice
            ;;
        *) note "queued resource $name is $state" ;;
    esac
    wait_active
}

deploy_code() {
    if [[ -n $repo_url ]]; then
        note "cloning $repo_url at $ref on all $workers workers into ~/$remote_dir"
        ssh_on all "rm -rf $remote_dir && git clone --quiet $(quote "$repo_url") $remote_dir && git -C $remote_dir checkout --quiet $(quote "$ref")"
        return
    fi
    local tarball="${TMPDIR:-/tmp}/gmflow_jax_${name}.tar.gz"
    if ((!dry_run)) && [[ -n $(git -C "$ROOT" --no-optional-locks status --porcelain --untracked-files=no) ]]; then
        note "warning: uncommitted changes in $ROOT are not deployed (git archive HEAD); commit them first"
    fi
    note "copying this checkout (git archive HEAD) to all $workers workers into ~/$remote_dir"
    run git -C "$ROOT" archive --format=tar.gz "--output=$tarball" HEAD || return
    run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "$name:gmflow_jax.tar.gz" --zone "$zone" ${project_args[@]+"${project_args[@]}"} --worker=all || return
    ssh_on all "rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf gmflow_jax.tar.gz -C $remote_dir"
}

install_code() {
    note "installing on all workers: pip install '.[tpu,gcs]' into ~/$venv"
    ssh_on all "set -e; if ! command -v $remote_python >/dev/null; then sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y $remote_python $remote_python-venv; fi; test -x $venv/bin/python || $remote_python -m venv $venv; $venv/bin/pip install -q --upgrade pip; cd $remote_dir && ~/$venv/bin/pip install -q '.[tpu,gcs]'"
}

# The trainer command on every worker (run from the home directory, so the installed package is used).
trainer_command() {
    local cmd=("$venv/bin/python" -m gmflow_jax.train ${trainer_args[@]+"${trainer_args[@]}"} --multihost --workdir "$workdir")
    ((${#env_kv[@]} == 0)) || cmd=(env ${env_kv[@]+"${env_kv[@]}"} "${cmd[@]}")
    quote_all "${cmd[@]}"
}

start_trainer() {
    note "starting the trainer on all $workers workers (log: ~/$log on each)"
    ssh_on all "if [ -f gmflow_train.pid ] && kill -0 \"\$(cat gmflow_train.pid)\" 2>/dev/null; then echo \"\$(hostname): the trainer is already running\"; else rm -f gmflow_train.exit; ( trap '' HUP; $(trainer_command) & echo \$! > gmflow_train.pid; wait \$!; echo \$? > gmflow_train.exit ) > $log 2>&1 < /dev/null & fi"
}

stop_trainer() {
    note "sending SIGTERM to the trainers on all workers (they save the current step and exit 0)"
    ssh_on all "if [ -f gmflow_train.pid ] && kill -TERM \"\$(cat gmflow_train.pid)\" 2>/dev/null; then echo \"\$(hostname): stopping the trainer\"; else echo \"\$(hostname): no trainer running\"; fi"
}

# Worker 0's exit status ('' while it runs).
exit_status() {
    if ((dry_run)); then
        ssh_on 0 "cat gmflow_train.exit 2>/dev/null || true"
        return
    fi
    ssh_on 0 "cat gmflow_train.exit 2>/dev/null || true" 2>/dev/null | tr -d '[:space:]' || true
}

tail_pid=""
start_tail() {
    note "streaming worker 0's log"
    if ((dry_run)); then
        ssh_on 0 "tail -n +1 -F $log"
    else
        set -m # its own process group: stop_tail stops gcloud and the ssh it started
        ssh_on 0 "tail -n +1 -F $log" &
        tail_pid=$!
        set +m
    fi
}
stop_tail() {
    if [[ -n $tail_pid ]]; then
        kill -- "-$tail_pid" 2>/dev/null || true
        wait "$tail_pid" 2>/dev/null || true
        tail_pid=""
    fi
}
# shellcheck disable=SC2329 # invoked by the trap
on_interrupt() {
    stop_tail
    note "stopped watching; the run goes on. Re-attach: --watch; stop it: --stop; tear down: --delete"
    exit 130
}

launch() {
    ensure_slice && deploy_code && install_code && start_trainer
}

watch_run() {
    local restarts=0 code
    trap on_interrupt INT TERM
    start_tail
    if ((dry_run)); then
        note "then every $poll s: the queued resource's state and worker 0's exit status:"
        read_state
        exit_status
        note "on preemption (SUSPENDED / FAILED / gone, at most $max_restarts times): delete, re-create, copy, install, start:"
        delete_slice
        create_slice
        note "... then the wait, copy, install and start commands above again (the trainer resumes from $workdir)"
        return 0
    fi
    while true; do
        sleep "$poll"
        read_state
        case $state in
            ACTIVE)
                code=$(exit_status)
                [[ -z $code ]] && continue
                stop_tail
                if [[ $code == 0 ]]; then
                    note "the trainer finished (exit status 0) on worker 0; the slice is kept (--delete to tear it down)"
                    return 0
                fi
                note "the trainer exited with status $code on worker 0 while $name is ACTIVE: not restarting (see ~/$log on the workers)"
                return 1
                ;;
            SUSPENDED | SUSPENDING | FAILED | MISSING)
                stop_tail
                if ((restarts >= max_restarts)); then
                    note "queued resource $name is $state and --max-restarts=$max_restarts restarts are used up"
                    return 1
                fi
                restarts=$((restarts + 1))
                note "queued resource $name is $state (preempted?): re-creating it, restart $restarts of at most $max_restarts"
                if [[ $state != MISSING ]]; then
                    delete_slice || continue
                    wait_gone
                fi
                launch || continue
                start_tail
                ;;
            *) ;; # provisioning, or a transient gcloud error: look again later
        esac
    done
}

case $action in
    delete)
        delete_slice
        exit 0
        ;;
    stop)
        stop_trainer
        exit 0
        ;;
esac

[[ -n $accelerator ]] || die "--accelerator is required"
[[ -n $workdir ]] || die "--workdir is required"
[[ $workdir == gs://* ]] || note "warning: --workdir '$workdir' is not a gs:// path; the workers do not share local disks"
((${#trainer_args[@]})) || die "trainer arguments are required after -- (at least --config NAME)"
describe_accelerator
note "accelerator $accelerator_type: $chips chips, $devices JAX devices on $workers workers (TPU VM hosts); runtime $runtime_version"

case $action in
    run | start)
        launch || {
            note "the launch failed (see the messages above); run the same command again to retry"
            exit 1
        }
        [[ $action == start ]] || watch_run
        ;;
    watch) watch_run ;;
esac
