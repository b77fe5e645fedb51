#!/usr/bin/env bash
# Issue 10's yardstick run: every row with 95% bootstrap intervals, fidelity to FP, paired
# comparisons and the calibration-seed spread, on N held-out prompts and seeds. On the GPU:
#   PHASE=quantize bash benchmarks/yardstick_eval.sh OUT [N=2000] [DEVICE=cuda]   # <= 9 min
#   PHASE=eval     bash benchmarks/yardstick_eval.sh OUT [N=2000] [DEVICE=cuda]   # <= 9 min
#   PHASE=summary  bash benchmarks/yardstick_eval.sh OUT [N=2000] [DEVICE=cuda]   # a few min
# (PHASE=all runs the three in turn.) Every step is resumable: run a phase again after a timeout
# and it continues (finished models and evals are skipped, Q-Diffusion's reconstruction resumes
# per unit, an eval resumes per image).
#
# quantize: the FP eval (needs no model) and four calibrations, concurrently (RTN's five evals
# follow its calibration and the FP eval, while Q-Diffusion still reconstructs):
#   qd_w4     Q-Diffusion W4, one calibration (seed 0), activation bank {4,5,6,8,16}
#   rtn_w8    RTN W8, bank {4,5,6,8,16}
#   qd_w4_s1, qd_w4_s2  the same Q-Diffusion W4 with calibration seeds 1 and 2 (`--seed` reaches
#             the calibration prompts, latents, row sampling, shuffles and reconstruction batches)
# eval: qd_w4 and rtn_w8 at A16, A8, A6, A5, A4; qd_w4_s1/s2 at A8; every eval with
#   --reference-run FP (FID/KID to FP, PSNR, perceptual distance), JOBS at a time.
# summary: summary.md (table with intervals, paired comparisons, seed spread), grids, and
#   OUT/export/*.tar (<= 8 files of <= 16 MB: what the docs need).
# QUANT_EXTRA adds options to every `qlip quantize` (smoke: QUANT_EXTRA="--recon-iters 5
# --recon-samples 16 --calib-num 4 --calib-steps 10 --calib-kept-steps 5"); EVAL_EXTRA to every
# `qlip eval` (smoke: EVAL_EXTRA="--steps 2 --bootstrap-resamples 50"); COMPARE_RESAMPLES sets the
# paired bootstrap of the summary (default 500; smoke: 20).
set -uo pipefail
out=${1:?output folder}; n=${2:-2000}; device=${3:-cuda}; phase=${PHASE:-all}; jobs=${JOBS:-6}
qlip="python3 -m qlip.cli"
# shellcheck disable=SC2206
common=(--model reference --device "$device" --prompts heldout --num-images "$n" --batch-size 250
        --steps 25 --guidance 4 ${EVAL_EXTRA:-})
# shellcheck disable=SC2206
quant=(--model reference --device "$device" --guidance 4 ${QUANT_EXTRA:-})
bank=4,5,6,8,16
mkdir -p "$out/logs"
cores=$(nproc)
export OMP_NUM_THREADS=$(( cores / jobs > 0 ? cores / jobs : 1 ))  # no oversubscription

# shellcheck source=benchmarks/timed.sh
source "$(dirname "$0")/timed.sh"
quantize() {  # quantize NAME [qlip quantize options...]: skipped when OUT/q_NAME is complete
    local name=$1; shift
    [ -e "$out/q_$name/quant_state.safetensors" ] && return 0
    timed "quantize $name" $qlip quantize "${quant[@]}" --out "$out/q_$name" "$@" \
        > "$out/logs/q_$name.txt" 2>&1
}
evaluate() {  # evaluate NAME LABEL [qlip eval options...]: skipped when metrics.json exists
    local name=$1 label=$2; shift 2
    [ -e "$out/eval_$name/metrics.json" ] && return 0
    timed "eval $name" $qlip eval "${common[@]}" --label "$label" --reference-run "$out/eval_fp" \
        --out "$out/eval_$name" "$@" > "$out/logs/eval_$name.txt" 2>&1
}
throttle() {  # wait while JOBS jobs run
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
}

if [ "$phase" = quantize ] || [ "$phase" = all ]; then
    [ -e "$out/eval_fp/metrics.json" ] || \
        (timed "eval fp" $qlip eval "${common[@]}" --label FP --out "$out/eval_fp" \
             > "$out/logs/eval_fp.txt" 2>&1) &
    quantize qd_w4 --method qdiffusion --wbits 4 --abits 8 --abits-options $bank --seed 0 &
    # RTN calibrates in a minute: its evals run while Q-Diffusion reconstructs
    (quantize rtn_w8 --method rtn --wbits 8 --abits 8 --abits-options $bank --seed 0
     while [ ! -e "$out/eval_fp/metrics.json" ]; do sleep 2; done
     for a in 16 8 6 5 4; do
         evaluate "rtn_w8a$a" "RTN W8A$a" --quantized "$out/q_rtn_w8" --abits "$a" &
     done
     wait) &
    for s in 1 2; do
        quantize "qd_w4_s$s" --method qdiffusion --wbits 4 --abits 8 --abits-options $bank \
            --seed "$s" &
    done
    wait
fi

if [ "$phase" = eval ] || [ "$phase" = all ]; then
    if [ ! -e "$out/eval_fp/metrics.json" ]; then
        echo "the FP eval is not finished: run PHASE=quantize again first" >&2; exit 1
    fi
    for a in 16 8 6 5 4; do
        throttle; evaluate "qd_w4a$a" "Q-Diffusion W4A$a" --quantized "$out/q_qd_w4" --abits "$a" &
        throttle; evaluate "rtn_w8a$a" "RTN W8A$a" --quantized "$out/q_rtn_w8" --abits "$a" &
    done
    for s in 1 2; do
        throttle; evaluate "qd_w4a8_s$s" "Q-Diffusion W4A8 seed $s" \
            --quantized "$out/q_qd_w4_s$s" --abits 8 &
    done
    wait
fi

if [ "$phase" = summary ] || [ "$phase" = all ]; then
    python3 benchmarks/yardstick_summary.py "$out" "$device"  # writes OUT/summary.md
fi
grep -h "exit [1-9]" "$out/timings.txt" 2>/dev/null && echo "some steps failed: see $out/logs" >&2
exit 0
