#!/usr/bin/env bash
# The natural-emergence recipes of issue 16 (docs/emergence-recipes.md): LLaVA-class organisms whose language model
# is trained from scratch (vision tower and projector frozen from `organism-llava`, as for `organism-llava-ids`) on
# mixtures meant to make position IDs the natural solution, with no planting. Each run writes its emergence
# snapshots (held-out accuracy, RSA peaks, CMA head counts with the re-paired null) to OUT/NAME/emergence.jsonl.
#
#   bash docs/emergence-recipes/recipes.sh OUT [MINUTES] [STEPS]     # all five runs at once, on the GPUs there are
#
# reading_order (seeds 0, 1, 2): every description answered by the first undescribed object in reading order, with
#   one or more objects left (the paper's form is the one-left case), plus colour retrieval, relation and counting.
# low_entropy: the paper's descriptions on 3x3 grids with shared features and many objects (low entropy), 3x3 colour
#   retrieval: scenes whose conjunctions cannot be found by subtracting features.
# curriculum: reading_order's mixture, after 800 steps of 2x2 scenes only.
set -u
OUT=${1:?give an output folder}
MIN=${2:-8.5}
STEPS=${3:-4000}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-src}
NGPU=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
W=${WORKERS:-5}
SD="--weight sd_2x2_high=0 --weight sd_2x2_low=0 --weight sd_2x2_any=0 --weight sd_3x3_high=0 --weight sd_3x3_low=0 \
--weight sd_3x3_any=0 --weight sd_3x2_high=0"
RO="$SD --weight ro_2x2=0.15 --weight ro_3x3=0.25 --weight ro_3x3_low=0.1"
LOW="--weight sd_2x2_high=0 --weight sd_2x2_low=0 --weight sd_2x2_any=0 --weight sd_3x2_high=0 \
--weight sd_3x3_high=0.05 --weight sd_3x3_low=0.35 --weight sd_3x3_any=0.1 --weight color_2x2=0 --weight color_3x3=0.3 \
--weight relation_2x2=0 --weight relation_3x3=0.1"
EARLY="--early-steps 800 --early-weight ro_3x3=0 --early-weight ro_3x3_low=0 --early-weight color_3x3=0 \
--early-weight relation_3x3=0 --early-weight counting_3x3=0 --early-weight relation_2x2=0.1"
COMMON="--arch llava --vision-from organism-llava --freeze-vision --label-mentions --steps $STEPS \
--max-minutes $MIN --workers $W"
i=0
launch() {  # launch NAME SEED FLAGS...
  local name=$1 seed=$2; shift 2
  CUDA_VISIBLE_DEVICES=$((i % NGPU)) python -m vismech.app.cli train-organism --out "$OUT/$name" --seed "$seed" \
    $COMMON "$@" > "$OUT/$name.log" 2>&1 &
  i=$((i + 1))
}
launch reading_order-s0 0 $RO
launch low_entropy-s0 0 $LOW
launch reading_order-s1 1 $RO
launch curriculum-s0 0 $RO $EARLY
launch reading_order-s2 2 $RO
wait
for f in "$OUT"/*.log; do echo "== $f"; tail -n 2 "$f"; done
