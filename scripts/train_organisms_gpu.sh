#!/usr/bin/env bash
# Train organisms side by side: the shipped two, or (SEEDS=1) also seeds 1 and 2 of the Qwen-style one for the seed
# comparison, or (RUNS="...;...") any list of "arch name seed steps [more train-organism options]". Runs go to the
# host's GPUs in turn (run i on GPU i mod GPUs). Each run stops after MINUTES and saves; RESUME=--resume continues
# runs in runs/org/; ARGS adds options to every run (the shipped organisms used ARGS=--label-mentions). WORKERS
# data workers a run (default 4). Qwen runs, one a GPU, made 3.9-4.5 steps/s with 4 workers each (4 x H100 host),
# 2 with 15 workers (2 x H200), 5.6 alone with 3 (1 x H200); two sharing a GPU made 1.5 each; the cause of the
# spread is not isolated (benchmarks/organism_step.py --loop-workers times one host's loop per worker count).
#   OUT=/tmp/out ARGS=--label-mentions bash scripts/train_organisms_gpu.sh
set -u
export PYTHONPATH=src OMP_NUM_THREADS=2
OUT=${OUT:-runs/org-out}
mkdir -p runs/org "$OUT"
if [ -n "${RUNS:-}" ]; then
  IFS=';' read -r -a specs <<< "$RUNS"
else
  specs=("qwen2_5_vl organism 0 ${QWEN_STEPS:-8000}" "llava organism-llava 0 ${LLAVA_STEPS:-8000}")
  [ "${SEEDS:-0}" = 1 ] && specs+=("qwen2_5_vl seed1 1 ${QWEN_STEPS:-8000}" "qwen2_5_vl seed2 2 ${QWEN_STEPS:-8000}")
fi
workers=${WORKERS:-4}
gpus=$(nvidia-smi -L | wc -l); [ "$gpus" -lt 1 ] && gpus=1
pids=(); names=(); i=0
for spec in "${specs[@]}"; do
  set -- $spec
  CUDA_VISIBLE_DEVICES=$(( i % gpus )) python -m vismech train-organism --arch "$1" --out "runs/org/$2" --seed "$3" \
    --steps "$4" --workers "$workers" --device cuda --max-minutes "${MINUTES:-8.3}" ${RESUME:-} ${ARGS:-} "${@:5}" \
    > "runs/org/$2.log" 2>&1 &
  pids+=($!); names+=("$2"); i=$((i + 1))
done
sleep 45; nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv; uptime
wait "${pids[@]}"
for d in "${names[@]}"; do
  tr '\r' '\n' < "runs/org/$d.log" | grep -v "^\s*$" | tail -2
  tar czf "$OUT/$d.tgz" --exclude=train_state.pt -C runs/org "$d" "$d.log"
done
ls -la "$OUT"
