#!/usr/bin/env bash
# The accelerator check, prepared for a lent GPU: one call of well under 10 minutes that runs
# bench/run_all.py's accelerator list — the train step at GPT-2 XL -> GPT-2 shapes in bfloat16 (MFU, where
# the time goes, memory), generation against transformers' `generate`, the loss table and its scale
# curve, the forward pass — and the speed-up benchmark on the demo pairs (T5, then GPT-2 with TRL), each
# under its own cap inside one deadline, most important first. A benchmark cut off by its cap leaves no
# results file; the log says which. Everything lands in $OUT as results.tgz plus the log.
#
#   bash bench/device_check.sh --wheels   # here, once, with network: the packages the device image
#                                         # lacks, as wheels in .whl/ (git-ignored; name it in `carry`)
#   bash bench/device_check.sh            # there: OUT=... (default runs/device_check), DEADLINE_S=520
#   EXTRA=--quick DEADLINE_S=200 bash bench/device_check.sh   # anywhere: tiny shapes, checks the script
#
# Back here: tar xzf results.tgz -C bench/results && python bench/run_all.py --render
set -uo pipefail
cd "$(dirname "$0")/.."

# pure-Python packages the device image (jax, flax, optax, orbax, torch, transformers, sacrebleu there)
# does not hold, at the versions requirements-dev.txt and bench/requirements.txt resolve to here
WHEELS=(ml-collections==1.1.0 rouge-score==0.1.2 nltk==3.10.4 trl==1.16.0 datasets==5.2.0 dill==0.4.1
  multiprocess==0.70.19)

if [[ "${1:-}" == "--wheels" ]]; then
  exec python3 -m pip wheel -q --no-deps -w .whl "${WHEELS[@]}"
fi

PY=${PYTHON:-python3}  # the device image's python3 holds jax and torch
OUT=${OUT:-runs/device_check}
DEADLINE_S=${DEADLINE_S:-520}
RESULTS=$(mktemp -d)
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
start=$SECONDS
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices()[0].device_kind,
'| flax', flax.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)" 2>&1
} | tee -a "$LOG"

bench() {  # bench CAP_S NAME...: run_all's accelerator variants of NAME, stopped at CAP_S or the deadline
  local cap=$1 left=$((DEADLINE_S - (SECONDS - start)))
  shift
  ((cap > left)) && cap=$left
  if ((cap < 30)); then
    echo "== skipped (deadline): $*" | tee -a "$LOG"
    return
  fi
  echo "== $* (cap ${cap}s, ${left}s left)" | tee -a "$LOG"
  # shellcheck disable=SC2086  # EXTRA: more run_all arguments (--quick: a dry run of this script anywhere)
  timeout -k 5 "$cap" "$PY" bench/run_all.py --only "$@" --results "$RESULTS" --out "$RESULTS/BENCHMARKS.md" \
    --log "$RESULTS/stderr.log" ${EXTRA:-} >>"$LOG" 2>&1
  echo "== $*: exit $? after $((SECONDS - start))s" | tee -a "$LOG"
}

bench 170 accelerator
bench 100 generate
bench 60 losses
bench 150 speedup
bench 60 scale
bench 60 forward
rm -rf "$RESULTS/runs"  # training runs of a --quick dry run
tar czf "$OUT/results.tgz" -C "$RESULTS" . && ls -l "$RESULTS" | tee -a "$LOG"
echo "== done in $((SECONDS - start))s" | tee -a "$LOG"
