#!/usr/bin/env bash
# Qwen planting with full-grid descriptions (issue 16): two organism-ids candidates on the two GPUs of one host,
# both with a third of their descriptions on a full grid with every object but one described (the validity set's
# 3x3 case, which the uniform draws reach once in 64 descriptions). A: no invariance term (the shipped
# organism-ids' objective); B: the invariance term at weight 1 (the spec's default, so R outputs carry no features).
# Resumable: run once with a time limit, then again with `resume` and the rest of the 15 minutes.
#
#   bash docs/organism-ids/full-scenes/runs.sh OUT MINUTES EVAL_N [resume]
#
# Other variants: A_FLAGS / B_FLAGS replace the two runs' own flags, RUNS the folder under runs/, e.g. split
# gathering (docs/organism-ids.md) with and without the invariance term:
#   RUNS=ids-split A_FLAGS="--plant-weight invariance=0 --plant-split-gathering" B_FLAGS="--plant-split-gathering" \
#     bash docs/organism-ids/full-scenes/runs.sh OUT 8.3 64
# ONLY=A (or B) runs that variant alone, on GPU 0 (the other GPU stays free, e.g. for benchmarks/gpu_session.sh).
# TAR=1 packs each organism (without its training state) into OUT as well, right after training: the device gives
# back at most 8 files of 16 MiB, so the six logs and the two organisms fill it; analyse them here, on the CPU.
set -u
OUT=${1:?give a log folder}; MIN=${2:?give the minutes}; EVAL=${3:-64}; RES=${4:+--resume}
export PYTHONPATH=${PYTHONPATH:-src}
mkdir -p "$OUT"
COMMON="--arch qwen2_5_vl --vision-from organism --freeze-vision --plant ids --plant-full-scenes 0.3 --steps 3400 \
--batch-size 32 --lr 0.001 --seed 0 --eval-every 500 --eval-n $EVAL --workers 14 --device cuda --max-minutes $MIN"
RUNS=${RUNS:-ids-full}
A_FLAGS=${A_FLAGS:---plant-weight invariance=0}
B_FLAGS=${B_FLAGS:-}
ONLY=${ONLY:-A B}
gpu=0
for r in $ONLY; do
  flags=$A_FLAGS; [ "$r" = B ] && flags=$B_FLAGS
  CUDA_VISIBLE_DEVICES=$gpu python -m vismech.app.cli train-organism --out "runs/$RUNS/$r" $COMMON $flags $RES \
    > "$OUT/$r.log" 2>&1 &
  gpu=$((gpu + 1))
done
wait
for r in $ONLY; do echo "== $r"; tail -n 2 "$OUT/$r.log"; cp "runs/$RUNS/$r/train_log.jsonl" "$OUT/$r.train_log.jsonl"
  cp "runs/$RUNS/$r/validity.json" "$OUT/$r.validity.json"; done
if [ -n "${TAR:-}" ]; then
  for r in $ONLY; do tar czf "$OUT/$r.tgz" -C "runs/$RUNS/$r" --exclude=train_state.pt .; done
fi
