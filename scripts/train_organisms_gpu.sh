#!/usr/bin/env bash
# Train the shipped organisms side by side on one GPU (and, with SEEDS=1, two extra seeds of the Qwen-style one for
# the seed comparison). Each run stops after MINUTES and saves; RESUME=--resume continues runs in runs/org/;
# ARGS adds train-organism options to every run (e.g. ARGS=--label-mentions).
#   OUT=/tmp/out bash scripts/train_organisms_gpu.sh
set -u
export PYTHONPATH=src OMP_NUM_THREADS=2
OUT=${OUT:-runs/org-out}
mkdir -p runs/org "$OUT"
specs=("qwen2_5_vl organism 0 ${QWEN_STEPS:-8000} ${QWEN_WORKERS:-3}" "llava organism-llava 0 ${LLAVA_STEPS:-8000} ${LLAVA_WORKERS:-3}")
[ "${SEEDS:-0}" = 1 ] && specs+=("qwen2_5_vl seed1 1 ${QWEN_STEPS:-8000} 3" "qwen2_5_vl seed2 2 ${QWEN_STEPS:-8000} 3")
pids=(); names=()
for spec in "${specs[@]}"; do
  set -- $spec
  python -m vismech train-organism --arch "$1" --out "runs/org/$2" --seed "$3" --steps "$4" --workers "$5" \
    --device cuda --max-minutes "${MINUTES:-8.3}" ${RESUME:-} ${ARGS:-} > "runs/org/$2.log" 2>&1 &
  pids+=($!); names+=("$2")
done
sleep 45; nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv; uptime
wait "${pids[@]}"
for d in "${names[@]}"; do
  tr '\r' '\n' < "runs/org/$d.log" | grep -v "^\s*$" | tail -2
  tar czf "$OUT/$d.tgz" --exclude=train_state.pt -C runs/org "$d" "$d.log"
done
ls -la "$OUT"
