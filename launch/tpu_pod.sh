#!/usr/bin/env bash
# Run distillm_jax on every worker of a Cloud TPU VM pod slice (one process per worker; JAX joins them).
#
#   launch/tpu_pod.sh setup NAME ZONE                 copy this repository to every worker, make its venv
#   launch/tpu_pod.sh train NAME ZONE [flags...]      launch/train.py on every worker at once, e.g.
#   launch/tpu_pod.sh train my-v4-32 us-central2-b --config configs/openllama_dolly.py \
#       --config.run_dir=gs://my-bucket/runs/openllama
#
# run_dir: a bucket (gs://...; the workers' service account needs read/write on it) or a file system every
# worker sees (NFS, a gcsfuse mount), never a worker's own disk: the hosts share none.
#
# Check the memory first: python launch/plan.py --config configs/openllama_dolly.py --devices 16 --memory_gib 32
# A preempted slice (exit 75 after a notice: saved): run the same train command again; it continues from
# the last checkpoint (--config.resume=True is needed only for a config changed on purpose).
set -euo pipefail
case "${1:-}" in -h|--help|-help) sed -n '2,/^[^#]/p' "$0" | grep '^#' | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cmd=${1:?usage: tpu_pod.sh setup|train NAME ZONE [flags...]}
name=${2:?TPU name}
zone=${3:?zone}
shift 3
repo=distillm_jax
ssh_all() { gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"; }
case "$cmd" in
  setup)
    here=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$here" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/$repo.tgz .
    gcloud compute tpus tpu-vm scp /tmp/$repo.tgz "$name":/tmp/$repo.tgz --zone "$zone" --worker=all
    ssh_all "mkdir -p ~/$repo && tar -C ~/$repo -xzf /tmp/$repo.tgz && cd ~/$repo && python3 -m venv .venv \
      && . .venv/bin/activate && pip install -q -r requirements.txt && pip install -q 'jax[tpu]==0.10.2'"
    ;;
  train)
    run_dir="" prev=""
    for a in "$@"; do
      case "$a" in --config.run_dir=*) run_dir=${a#--config.run_dir=} ;; esac
      [ "$prev" = "--config.run_dir" ] && run_dir=$a
      prev=$a
    done
    case "$run_dir" in
      gs://*) ;;
      s3://*) echo "tpu_pod.sh: run_dir $run_dir: orbax checkpoints to gs:// or a mount only" >&2; exit 2 ;;
      "") echo "tpu_pod.sh: pass --config.run_dir=gs://BUCKET/PATH (the hosts share no disk)" >&2; exit 2 ;;
      *) echo "tpu_pod.sh: note: $run_dir must be a mount every worker sees (NFS, gcsfuse); gs://... needs none" >&2 ;;
    esac
    args=$(printf ' %q' "$@")
    ssh_all "cd ~/$repo && . .venv/bin/activate && python launch/train.py$args --config.distributed.auto=True"
    ;;
  *) echo "usage: tpu_pod.sh setup|train NAME ZONE [flags...]" >&2; exit 2 ;;
esac
