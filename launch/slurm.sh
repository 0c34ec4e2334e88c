#!/usr/bin/env bash
# Multi-node GPUs under SLURM: one process per node, each owning its node's GPUs; JAX joins them from
# the SLURM environment. Submit from the repository root (the venv made by the README's install command
# plus the CUDA jax: pip install "jax[cuda12]==0.10.2"):
#
#   sbatch --nodes=2 launch/slurm.sh --config configs/openllama_dolly.py --config.run_dir=/shared/runs/ol
#
# run_dir must be on a file system every node sees. Check the memory first:
#   python launch/plan.py --config configs/openllama_dolly.py --devices 16 --memory_gib 80
# A job that was stopped (exit 75: SIGTERM or Ctrl-C, saved) or killed: submit the same command again;
# it continues from the last checkpoint (--config.resume=True is needed only for a config changed on purpose).
#SBATCH --job-name=distillm
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=slurm-%j.out
set -euo pipefail
case "${1:-}" in -h|--help|-help) sed -n '2,/^[^#]/p' "$0" | grep '^#' | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
. .venv/bin/activate
srun python launch/train.py "$@" --config.distributed.auto=True
