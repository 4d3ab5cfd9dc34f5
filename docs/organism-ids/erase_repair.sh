#!/usr/bin/env bash
# Erase and repair (issue 16, the R-probe bar): the planted organism RUN's ID-retrieval values lose the mentioned
# object's colour and shape (LEACE, python -m vismech.organism.erase), then the layers after the retrieval layer are
# trained again on the planting loss with everything up to it frozen (--freeze-through), so the erased R outputs stay
# what the erasure made them while the later heads learn to read them; then validity (n = 128) and recovery. Erasing
# without the repair kept the cell and removed the features but broke 3x3 descriptions (the twelfth: 18.8%).
# The logs come back as OUT/repair.tgz, the repaired organism (without its training state) as OUT/repaired.tgz.
# The shipped organism-ids is the sixteenth attempt (plant_15min.sh with BATCH=48, INV_FRAC=0.36) with the twelfth's
# FLAGS (no --plant-invariance-from) plus --plant-solo 0.5, STEPS=800, 2.4 minutes; before it, the twelfth attempt
# with the same FLAGS and STEPS, 2.8 minutes.
#
#   BUDGET=12.4 SCALE=0.92 FLAGS="..." RUN=runs/org/x bash docs/organism-ids/plant_15min.sh OUT 1 6.2   # then part 2
#   FLAGS="..." RUN=runs/org/x bash docs/organism-ids/erase_repair.sh OUT 2.0
#
# The second argument: the repair's minutes of training loop (default: what RUN's training loop, read from its log,
# and the erasure left of the 15-minute budget). FLAGS: the planting flags of RUN (the repair keeps them but
# --plant-invariance-from; its position probe is off: layer 1 is frozen). SEED (0): the repair's. LR (5e-4),
# STEPS (800: what 2.8 minutes bought on an H200), LAYER (2: the retrieval layer). For a check on the CPU: DEVICE=cpu
# WORKERS=0 TRIALS=16 BATCH=2 N=4 STEPS=2 EVAL_N=2.
set -u
OUT=${1:?give a log folder}; MIN=${2:-}
export PYTHONPATH=${PYTHONPATH:-src}
RUN=${RUN:?give the planted run folder}
# the late terms run from the repair's first step: it starts from a trained organism
FLAGS=$(echo "${FLAGS:-}" | sed -E 's/--plant-invariance-from [0-9]+//')
DEVICE=${DEVICE:-cuda}; N=${N:-128}
LOGS=$RUN.repair.logs
mkdir -p "$OUT" "$LOGS"
start=$(date +%s)
python -m vismech.organism.erase "$RUN" --out "$RUN-erased" --trials "${TRIALS:-2048}" --device "$DEVICE" \
  > "$LOGS/erase.log" 2>&1 || { tail -3 "$LOGS/erase.log"; exit 1; }
echo "erasure: $(( $(date +%s) - start )) s" | tee "$LOGS/minutes.txt"
# no minutes given: what RUN's training loop (every part, from its log) and the erasure left of 15
MIN=${MIN:-$(python -c "import json; r = [json.loads(l) for l in open('$RUN/train_log.jsonl')]; \
print(round(max(0.5, 15 - r[-1]['seconds'] / 60 - $(( $(date +%s) - start )) / 60), 2))")}
echo "repair: $MIN minutes" | tee -a "$LOGS/minutes.txt"
python -m vismech.app.cli train-organism --arch qwen2_5_vl --out "$RUN-repaired" --batch-size "${BATCH:-32}" \
  --plant ids $FLAGS --plant-weight probe=0 --init-from "$RUN-erased" --freeze-through "${LAYER:-2}" \
  --eval-every 500 --workers "${WORKERS:-15}" --device "$DEVICE" --steps "${STEPS:-800}" --eval-n "${EVAL_N:-64}" \
  --lr "${LR:-0.0005}" --seed "${SEED:-0}" --max-minutes "$MIN" > "$LOGS/train.log" 2>&1
grep "^organism qwen" "$LOGS/train.log" || tail -3 "$LOGS/train.log"
cp "$RUN-repaired/train_log.jsonl" "$LOGS/" 2>/dev/null
cp "$RUN-erased/erasure.json" "$LOGS/" 2>/dev/null
python -m vismech.organism.validate "$RUN-erased" -n "$N" --device "$DEVICE" --measures accuracy,probes \
  --out "$LOGS/validity-erased.json" > "$LOGS/validate-erased.log" 2>&1
python -m vismech.organism.validate "$RUN-repaired" -n "$N" --device "$DEVICE" --out "$LOGS/validity.json" \
  > "$LOGS/validate.log" 2>&1
python -m vismech.app.cli run recovery --model "$RUN-repaired" --device "$DEVICE" --out "$RUN-repaired.recovery" \
  > "$LOGS/recovery.log" 2>&1
cp "$RUN-repaired.recovery/results/recovery.json" "$LOGS/" 2>/dev/null
tar czf "$OUT/repaired.tgz" -C "$RUN-repaired" --exclude=train_state.pt .
tar czf "$OUT/repair.tgz" -C "$LOGS" .
