#!/usr/bin/env bash
# A planting term as a short continuation of the shipped organism-ids (issue 16): every weight from it, the ninth
# attempt's planting flags with the loss term LOSS (default guard; or balance) at weight W and no position probe (a
# fresh probe's first gradients would move the trained position code), 800 steps at learning rate 3e-4 in at most 2.1
# minutes, so that the shipped attempt's training and this stay within the 15-minute budget; then validity
# (n = 128) and recovery, packed as OUT/NAME.tgz. The shipped organism-ids was the ninth attempt for the guard and
# balance3 continuations, the twelfth for guard3 (git show 6c4c5e9 has the ninth).
#
#   bash docs/organism-ids/guard/finetune.sh OUT NAME W [LOSS]
#
# EXTRA: more planting flags (the twelfth attempt's continuation: EXTRA="--plant-weight balance=1").
set -u
OUT=${1:?give a log folder}; NAME=${2:?give a name}; W=${3:?give the weight}; LOSS=${4:-guard}
export PYTHONPATH=${PYTHONPATH:-src}
RUN=runs/org/$NAME
mkdir -p "$OUT" "$RUN.logs"
python -m vismech.app.cli train-organism --arch qwen2_5_vl --out "$RUN" --batch-size 32 --plant ids \
  --plant-full-scenes 0.3 --plant-drop-late-mlps --plant-weight invariance_s=1 --plant-weight "$LOSS=$W" \
  --plant-weight probe=0 ${EXTRA:-} --init-from organism-ids --freeze-vision --eval-every 400 --workers 12 \
  --device cuda \
  --steps 800 --eval-n 64 --lr 0.0003 --seed 0 --max-minutes 2.1 > "$RUN.logs/train.log" 2>&1
grep "^organism qwen" "$RUN.logs/train.log"
cp "$RUN/train_log.jsonl" "$RUN.logs/"
python -m vismech.organism.validate "$RUN" -n 128 --device cuda --out "$RUN.logs/validity.json" > "$RUN.logs/validate.log" 2>&1
python -m vismech.app.cli run recovery --model "$RUN" --device cuda --out "$RUN.recovery" > "$RUN.logs/recovery.log" 2>&1
cp "$RUN.recovery/results/recovery.json" "$RUN.logs/" 2>/dev/null
tar czf "$RUN.logs/organism.tgz" -C "$RUN" --exclude=train_state.pt .
tar czf "$OUT/$NAME.tgz" -C "$RUN.logs" .
