#!/usr/bin/env bash
# The seventh Qwen attempt (issue 16): nine cell IDs (--plant-cell-code) with the position probe weighted 3, the
# third attempt's B recipe otherwise (full-grid share 0.3, the invariance term), as many steps as 15 minutes of
# training loop buy at the speed measured first (benchmarks/organism_step.py, the loop with 12 workers), in two
# resumable parts on one warm machine:
#   bash docs/organism-ids/cell-code-2/runs.sh OUT 1 6.8      # measures the speed, fixes the steps, trains 6.8 min
#   bash docs/organism-ids/cell-code-2/runs.sh OUT 2 7.8      # resumes for the rest; packs the organism into OUT
set -u
OUT=${1:?give a log folder}; PART=${2:?give the part, 1 or 2}; MIN=${3:?give the minutes}
export PYTHONPATH=${PYTHONPATH:-src}
mkdir -p "$OUT"
RUN=runs/org/cells2
if [ "$PART" = 1 ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
  python benchmarks/organism_step.py --plant --batch-size 32 --steps 6 --workers 12 --loop-workers 12 \
    --loop-steps 40 > "$OUT/organism_step.log" 2>&1
  rate=$(grep "training loop with 12" "$OUT/organism_step.log" | awk '{print $(NF-1)}')
  # 15 minutes less a margin for the held-out evaluations every 500 steps, in hundreds of steps
  mkdir -p runs/org
  python -c "print(int(float('${rate:-4.4}') * 0.93 * 14.6 * 60 / 100) * 100)" > "$RUN.steps"
  RES=
else
  RES=--resume
fi
STEPS=$(cat "$RUN.steps")
echo "steps $STEPS" | tee -a "$OUT/steps.txt"
python -m vismech.app.cli train-organism --arch qwen2_5_vl --out "$RUN" --batch-size 32 --plant ids \
  --plant-cell-code --plant-full-scenes 0.3 --plant-weight probe=3 --vision-from organism --freeze-vision \
  --eval-every 500 --workers 12 --device cuda --steps "$STEPS" --eval-n 64 --lr 0.001 --seed 0 \
  --max-minutes "$MIN" $RES > "$OUT/train$PART.log" 2>&1
tail -n 3 "$OUT/train$PART.log"
cp "$RUN/train_log.jsonl" "$OUT/" 2>/dev/null
if [ "$PART" = 2 ]; then
  cp "$RUN/validity.json" "$OUT/" 2>/dev/null
  tar czf "$OUT/organism.tgz" -C "$RUN" --exclude=train_state.pt .
fi
