#!/usr/bin/env bash
# The base quantizers' table on the reference world (issues 4 and 5): FP; RTN W8A8, W4A8;
# Q-Diffusion W8A8, W4A8, W4A16, W4A6; PTQD W4A8, W4A16 on the same N held-out prompts and seeds,
# plus the real-vs-real FID floor. Run on the GPU:
#   bash benchmarks/base_quantizers_eval.sh OUT_DIR [NUM_IMAGES] [DEVICE]
#
# Q-Diffusion's three W4 rows share one quantized model: its weights do not depend on the
# activation bits, and its activation bank holds a quantizer per bit-width (6, 8, 16), chosen at
# evaluation with --abits. PTQD's statistics depend on the activation bits: one model per row.
# The rows run as concurrent processes (the small model leaves the GPU mostly idle), so each
# wall time in timings.txt is measured under that shared load: an upper bound of a lone run's.
# WEIGHTS_FROM=DIR: Q-Diffusion and PTQD reuse the weights of DIR/q_NAME (an earlier run of this
# script: the reconstruction does not depend on the activation calibration) and only calibrate
# their activations (and PTQD its statistics) again.
# QUANT_EXTRA adds options to every `qlip quantize` (a smoke run: QUANT_EXTRA="--recon-iters 5
# --recon-samples 16 --calib-num 4 --calib-steps 10 --calib-kept-steps 5 --ptqd-prompts 4").
set -uo pipefail
out=${1:?output folder}; n=${2:-1000}; device=${3:-cuda}
qlip="python3 -m qlip.cli"
common=(--model reference --device "$device" --prompts heldout --num-images "$n" --batch-size 250
        --steps 25 --guidance 4)
# shellcheck disable=SC2206
quant=(--model reference --device "$device" --guidance 4 ${QUANT_EXTRA:-})
mkdir -p "$out/logs"

# shellcheck source=benchmarks/timed.sh
source "$(dirname "$0")/timed.sh"
quantize() {  # quantize NAME [qlip quantize options...]: skipped when OUT/q_NAME is complete
    local name=$1; shift
    [ -e "$out/q_$name/quant_state.safetensors" ] && return 0
    if [ -n "${WEIGHTS_FROM:-}" ] && [ "${name#rtn}" = "$name" ]; then
        set -- "$@" --weights-from "$WEIGHTS_FROM/q_$name"
    fi
    timed "quantize $name" $qlip quantize "${quant[@]}" --out "$out/q_$name" "$@"
}
after_fp() {  # wait for the FP images: every row's image distance is measured against them
    while [ ! -e "$out/fp.done" ]; do sleep 2; done
}
evaluate() {  # evaluate NAME LABEL [qlip eval options...]
    local name=$1 label=$2; shift 2
    after_fp
    timed "eval $name" $qlip eval "${common[@]}" --label "$label" --reference-run "$out/fp" \
        --out "$out/eval_$name" "$@"
}

(timed "eval fp" $qlip eval "${common[@]}" --label FP --out "$out/fp"; touch "$out/fp.done") \
    > "$out/logs/fp.txt" 2>&1 &
(quantize rtn_w8a8 --method rtn --wbits 8 --abits 8 \
     && evaluate rtn_w8a8 "RTN W8A8" --quantized "$out/q_rtn_w8a8"
 quantize rtn_w4a8 --method rtn --wbits 4 --abits 8 \
     && evaluate rtn_w4a8 "RTN W4A8" --quantized "$out/q_rtn_w4a8") > "$out/logs/rtn.txt" 2>&1 &
(quantize qd_w8 --method qdiffusion --wbits 8 --abits 8 \
     && evaluate qd_w8a8 "Q-Diffusion W8A8" --quantized "$out/q_qd_w8") > "$out/logs/qd_w8.txt" 2>&1 &
(quantize qd_w4 --method qdiffusion --wbits 4 --abits 8 --abits-options 6,8,16 \
 && for a in 8 16 6; do
        evaluate "qd_w4a$a" "Q-Diffusion W4A$a" --quantized "$out/q_qd_w4" --abits "$a"
    done) > "$out/logs/qd_w4.txt" 2>&1 &
for a in 8 16; do
    (quantize "ptqd_w4a$a" --method ptqd --wbits 4 --abits "$a" --ptqd-prompts 64 --ptqd-steps 25 \
     && evaluate "ptqd_w4a$a" "PTQD W4A$a" --quantized "$out/q_ptqd_w4a$a") \
        > "$out/logs/ptqd_w4a$a.txt" 2>&1 &
done
wait
rows=("$out/fp")
for name in rtn_w8a8 rtn_w4a8 qd_w8a8 qd_w4a8 qd_w4a16 qd_w4a6 ptqd_w4a8 ptqd_w4a16; do
    [ -e "$out/eval_$name/metrics.json" ] && rows+=("$out/eval_$name")
done
python3 -m qlip.evaluation.report "${rows[@]}" | tee "$out/summary.md"
