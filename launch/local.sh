#!/usr/bin/env bash
# N trainer processes on this machine over loopback: the multi-host code path on one box.
#
#   launch/local.sh [--dry-run] --processes N --devices-per-process D --workdir DIR [--port P] \
#       [--grace SECONDS] -- TRAINER_ARGS...
#
# Starts N copies of `python -m gmflow_jax.train TRAINER_ARGS --workdir DIR
# --coordinator_address=127.0.0.1:P --num_processes=N --process_id=I`, each on D simulated CPU
# devices (XLA_FLAGS=--xla_force_host_platform_device_count=D, JAX_PLATFORMS=cpu), prefixes every
# output line with "[I] ", waits for all of them and exits with the first non-zero exit status.
# When one process fails, or on Ctrl-C / SIGTERM, the others get SIGTERM (the trainer then saves
# its current step and exits 0 when it can), and SIGKILL after --grace seconds (default 20).
# --dry-run prints the N commands (one line each, shell-quoted) and starts nothing.
# The interpreter is ${PYTHON:-python3}.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ && !/^#SBATCH/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
die() { printf 'launch/local.sh: error: %s\n' "$*" >&2; exit 2; }

((BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1))) || die "needs bash >= 5.1 (wait -n -p)"
PYTHON=${PYTHON:-python3}
dry_run=0
processes=""
devices=""
workdir=""
port=""
grace=20
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --processes) processes=${2:?--processes needs a value}; shift ;;
        --processes=*) processes=${1#*=} ;;
        --devices-per-process) devices=${2:?--devices-per-process needs a value}; shift ;;
        --devices-per-process=*) devices=${1#*=} ;;
        --workdir) workdir=${2:?--workdir needs a value}; shift ;;
        --workdir=*) workdir=${1#*=} ;;
        --port) port=${2:?--port needs a value}; shift ;;
        --port=*) port=${1#*=} ;;
        --grace) grace=${2:?--grace needs a value}; shift ;;
        --grace=*) grace=${1#*=} ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (trainer flags go after --; see --help)" ;;
    esac
    shift
done
trainer_args=("$@")

[[ $processes =~ ^[1-9][0-9]*$ ]] || die "--processes must be a positive integer, got '${processes}'"
[[ $devices =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer, got '${devices}'"
[[ -n $workdir ]] || die "--workdir is required"
[[ $grace =~ ^[0-9]+$ ]] || die "--grace must be a number of seconds, got '${grace}'"
if [[ -z $port ]]; then
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[[ $port =~ ^[0-9]+$ ]] || die "--port must be a number, got '${port}'"

# The command of process $1, into the array `cmd`.
command_of() {
    cmd=(env "XLA_FLAGS=--xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
        "$PYTHON" -m gmflow_jax.train "${trainer_args[@]}" --workdir "$workdir"
        "--coordinator_address=127.0.0.1:${port}" "--num_processes=${processes}" "--process_id=$1")
}

if ((dry_run)); then
    for ((i = 0; i < processes; i++)); do
        command_of "$i"
        printf '%q ' "${cmd[@]}"
        printf '\n'
    done
    exit 0
fi

fifo_dir=$(mktemp -d)
pids=()
prefixers=()
# shellcheck disable=SC2329 # invoked by the trap
cleanup() { rm -rf "$fifo_dir"; }
trap cleanup EXIT

# SIGTERM to the trainers still running, SIGKILL to those left after the grace period.
stop_all() {
    local pid t
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for ((t = 0; t < grace * 10; t++)); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
# shellcheck disable=SC2329 # invoked by the trap
on_signal() {
    printf 'launch/local.sh: interrupted; stopping the %d processes\n' "$processes" >&2
    trap - INT TERM
    stop_all
    wait "${pids[@]}" 2>/dev/null || true
    wait "${prefixers[@]}" 2>/dev/null || true
    exit 130
}
trap on_signal INT TERM

for ((i = 0; i < processes; i++)); do
    command_of "$i"
    mkfifo "$fifo_dir/$i"
    awk -v prefix="[$i] " '{ print prefix $0; fflush() }' <"$fifo_dir/$i" &
    prefixers+=("$!")
    # each process leads its own process group (setsid): stopping it stops whatever it started
    setsid "${cmd[@]}" >"$fifo_dir/$i" 2>&1 </dev/null &
    pids+=("$!")
done

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
    done_pid=""
    if wait -n -p done_pid "${running[@]}"; then rc=0; else rc=$?; fi
    [[ -n $done_pid ]] || continue # interrupted by a trapped signal
    still=()
    for pid in "${running[@]}"; do [[ $pid == "$done_pid" ]] || still+=("$pid"); done
    running=("${still[@]}")
    for ((i = 0; i < processes; i++)); do
        [[ ${pids[i]} == "$done_pid" ]] && break
    done
    if ((rc != 0)); then
        printf 'launch/local.sh: process %d exited with status %d\n' "$i" "$rc" >&2
        if ((status == 0)); then
            status=$rc
            if ((${#running[@]} > 0)); then
                printf 'launch/local.sh: stopping the other processes\n' >&2
                stop_all
            fi
        fi
    fi
done
wait "${prefixers[@]}" 2>/dev/null || true
exit "$status"
