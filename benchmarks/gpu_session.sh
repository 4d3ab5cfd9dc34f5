#!/usr/bin/env bash
# One GPU session of issue 19's benchmarks, in order, each under a time limit; outputs (logs, JSON) under $OUT.
#
#   bash benchmarks/gpu_session.sh cma       # Qwen2.5-VL-7B and LLaVA-1.5-7B: bf16 sweep (+null, baselines), fp32 check
#   bash benchmarks/gpu_session.sh families  # LLaVA-OneVision-7B, Idefics2-8B: bf16 sweep with null (~5 min)
#   bash benchmarks/gpu_session.sh large     # Qwen2.5-VL-32B: bf16 sweep with null (~5 min)
#   bash benchmarks/gpu_session.sh runall    # `run all` on Qwen2.5-VL-7B, per experiment (limit 560 s)
#   bash benchmarks/gpu_session.sh edits     # Qwen2.5-VL-7B: intervention settings stacked vs one forward each;
#                                            # edits joined into one write vs one copy each
#   bash benchmarks/gpu_session.sh sweeps    # the bf16 sweeps with the null only (no baselines): Qwen2.5-VL-7B,
#                                            # LLaVA-1.5-7B, and the newer families Qwen3-VL-8B and Gemma-3-12B
#                                            # (ONLY_7B=1: the first two alone)
#   bash benchmarks/gpu_session.sh counting  # Qwen2.5-VL-7B: counting-ablation's settings now vs before
#   bash benchmarks/gpu_session.sh ab        # prefix cut from the clean forward, low-precision attention products:
#                                            # each against its alternative in one process (Qwen-7B, LLaVA-7B)
# Each stage stays under the 10-minute limit of one device command (sum of its limits + exits).
#
# Random weights of the published architectures (random:PRESET), bf16 unless noted; fp32 runs check fast == naive
# (exit status 1 of a step = a score difference beyond 1e-3). A step that runs out of time is reported and the next
# one starts. Run from the repository root.
set -u
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH=src
B=benchmarks/cma_engine.py
step() {  # step NAME LIMIT_SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local t0=$SECONDS
  timeout --signal=INT "$limit" ${PY:-python} "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -e "^Loading" -e "it/s]" "$OUT/$name.log" | tail -n 16
  echo "--- $name: exit $rc after $((SECONDS - t0)) s"
}
case "${1:-cma}" in
  cma)  # about 5-7 min on one H200 (fp32 LLaVA-1.5-7B did not finish in 70 s: random init + naive sample)
    step qwen7b_bf16 110 $B --model random:Qwen2.5-VL-7B --dtype bf16 --pairs 50 --null --before-heads 112 \
      --json "$OUT/qwen7b_bf16.json"
    step qwen7b_fp32 70 $B --model random:Qwen2.5-VL-7B --dtype fp32 --pairs 8 --only-check \
      --json "$OUT/qwen7b_fp32.json"
    step llava7b_bf16 100 $B --model random:LLaVA-1.5-7B --dtype bf16 --pairs 50 --null --before-heads 32 \
      --skip rows,attribution --json "$OUT/llava7b_bf16.json"
    step llava7b_fp32 150 $B --model random:LLaVA-1.5-7B --dtype fp32 --pairs 8 --only-check \
      --json "$OUT/llava7b_fp32.json"
    ;;
  families)  # about 5 min: the sweep with the null (check on 1 sampled head a condition); limits from the
    # partial run of 2026-11-30 (fast sweep 21.3 s and 11.6 s, the null about as much again, plus build and check)
    step onevision7b_bf16 170 $B --model random:LLaVA-OneVision-7B --dtype bf16 --pairs 50 --null --only-check \
      --sample-heads 1 --json "$OUT/onevision7b_bf16.json"
    step idefics2_8b_bf16 130 $B --model random:Idefics2-8B --dtype bf16 --pairs 50 --null --only-check \
      --sample-heads 1 --json "$OUT/idefics2_8b_bf16.json"
    ;;
  large)  # about 5-6 min: the 32B's sweep with the null only (one condition took 92.7 s on 2026-11-30)
    step qwen32b_bf16 330 $B --model random:Qwen2.5-VL-32B --dtype bf16 --pairs 50 --null --only-check \
      --skip fast --sample-heads 1 --json "$OUT/qwen32b_bf16.json"
    ;;
  sweeps)  # about 8 min: fast engine and the sweep as `run cma` runs it; one naive head a condition for the check
    step qwen7b_bf16 140 $B --model random:Qwen2.5-VL-7B --dtype bf16 --pairs 50 --null --only-check \
      --sample-heads 1 --json "$OUT/qwen7b_bf16.json"
    step llava7b_bf16 150 $B --model random:LLaVA-1.5-7B --dtype bf16 --pairs 50 --null --only-check \
      --sample-heads 1 --json "$OUT/llava7b_bf16.json"
    [ -n "${ONLY_7B:-}" ] || step qwen3vl8b_bf16 110 $B --model random:Qwen3-VL-8B-Instruct --dtype bf16 --pairs 16 --only-check \
      --sample-heads 1 --json "$OUT/qwen3vl8b_bf16.json"
    [ -n "${SKIP_GEMMA:-}${ONLY_7B:-}" ] || step gemma3_12b_bf16 110 $B --model random:gemma-3-12b-it --dtype bf16 --pairs 16 --only-check \
      --sample-heads 1 --json "$OUT/gemma3_12b_bf16.json"
    ;;
  edits)  # about 4-5 min
    step edits_qwen7b_bf16 200 benchmarks/edits.py --model random:Qwen2.5-VL-7B --device cuda --dtype bf16 --n 64
    step edit_writes_qwen7b_bf16 150 benchmarks/edit_writes.py --model random:Qwen2.5-VL-7B --device cuda \
      --dtype bf16 --pairs 50
    ;;
  runall)  # PYSPY=path/to/py-spy: sampled Python stacks of the whole run (collapsed, $OUT/run_all.raw), where
    # each experiment's time goes (carry the py-spy wheel as the device README says)
    PY=python
    [ -z "${PYSPY:-}" ] || PY="$PYSPY record -s -r 20 -f raw -o $OUT/run_all.raw -- python"
    step run_all_qwen7b "${RUNALL_LIMIT:-560}" benchmarks/run_all.py --model random:Qwen2.5-VL-7B --dtype bf16 \
      --out "$OUT/run_all_qwen7b" --json "$OUT/run_all_qwen7b.json"
    ;;
  counting)  # about 5 min: counting-ablation's settings now vs before, one pass's breakdown; the fp32 step
    # settles whether decode.greedy and HF generate part only by bf16 rounding (they must agree in fp32)
    step counting_qwen7b_bf16 230 benchmarks/counting.py --model random:Qwen2.5-VL-7B --device cuda --dtype bf16 \
      --n 32
    step counting_qwen7b_fp32 150 benchmarks/counting.py --model random:Qwen2.5-VL-7B --device cuda --dtype fp32 \
      --n 8 --batch-size 8 --max-new-tokens 24
    ;;
  ab)  # about 4 min
    step ab_qwen7b_bf16 120 benchmarks/setup_ab.py --model random:Qwen2.5-VL-7B --device cuda --dtype bf16 \
      --condition id_selection
    step ab_llava7b_bf16 150 benchmarks/setup_ab.py --model random:LLaVA-1.5-7B --device cuda --dtype bf16 \
      --condition id_retrieval
    ;;
  *) echo "usage: gpu_session.sh cma|families|large|edits|runall|sweeps|counting|ab" >&2; exit 2 ;;
esac
