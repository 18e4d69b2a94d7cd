#!/usr/bin/env bash
# The paper's ImageNet 256 evaluation of a GMFlow checkpoint (GMFlow, ICML 2025, Table 2 and Fig. 5):
# GM-ODE 2 at 8 steps x 16 sub-steps and 32 x 4, GM-SDE 2 at 8 and 32 steps, orthogonal probabilistic
# guidance swept over its 20 values, 50,000 samples per setting against the ADM reference batch.
#
#   launch/eval_imagenet_paper.sh [--dry-run] --workdir CKPT --out DIR --ref VIRTUAL_imagenet256_labeled.npz \
#       [--inception pt_inception-2015-12-05-6726825d.pth] [-- EXTRA_EVALUATE_FLAGS...]
#
# Runs `python -m gmflow_jax.evaluate` once per solver setting into one DIR, so metrics.json, metrics.csv
# and the sweep plots there hold all four curves. --ref and --inception take a path, gs:// or http(s):// URL;
# without --inception the evaluation fetches pytorch-fid's weights from their official URL (cached once).
# Each run resumes where a killed one stopped. EXTRA flags go to every run (e.g. --multihost on a pod,
# --chunk_size 512 on a large GPU). --dry-run prints the four commands (one line each, shell-quoted) and
# starts nothing. The interpreter is ${PYTHON:-python3}.
# Cost (docs/benchmarks.md, bench/eval_cost.py): about 4M samples and 160M network evaluations.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
die() { printf 'launch/eval_imagenet_paper.sh: error: %s\n' "$*" >&2; exit 2; }

PYTHON=${PYTHON:-python3}
GUIDANCE=0.02,0.03,0.04,0.05,0.06,0.07,0.08,0.09,0.11,0.13,0.16,0.19,0.23,0.27,0.33,0.39,0.47,0.55,0.65,0.75
dry_run=0
workdir=""
out=""
ref=""
inception=""
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --workdir) workdir=${2:?--workdir needs a value}; shift ;;
        --workdir=*) workdir=${1#*=} ;;
        --out) out=${2:?--out needs a value}; shift ;;
        --out=*) out=${1#*=} ;;
        --ref) ref=${2:?--ref needs a value}; shift ;;
        --ref=*) ref=${1#*=} ;;
        --inception) inception=${2:?--inception needs a value}; shift ;;
        --inception=*) inception=${1#*=} ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
[[ -n $workdir && -n $out && -n $ref ]] || die "--workdir, --out and --ref are required"
inception_flag=()
[[ -z $inception ]] || inception_flag=("--inception=$inception")

settings=(
    "--solver=gm-ode --num_steps=8 --num_substeps=16"
    "--solver=gm-ode --num_steps=32 --num_substeps=4"
    "--solver=gm-sde --num_steps=8 --num_substeps=1"
    "--solver=gm-sde --num_steps=32 --num_substeps=1"
)
for setting in "${settings[@]}"; do
    read -r -a setting_flags <<<"$setting"
    cmd=("$PYTHON" -m gmflow_jax.evaluate "--workdir=$workdir" "--out=$out" "--ref=$ref" "${inception_flag[@]}"
        --num_samples=50000 --order=2 "${setting_flags[@]}" "--guidance=$GUIDANCE" --seed=0 "$@")
    if ((dry_run)); then
        printf '%q ' "${cmd[@]}"
        printf '\n'
    else
        "${cmd[@]}"
    fi
done
