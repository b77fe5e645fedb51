#!/usr/bin/env bash
# The reference world's quality table (issue 4): FP, RTN W8A8, RTN W4A8 on N held-out prompts,
# same seeds for every row, plus the real-vs-real FID floor. Run on the GPU:
#   bash benchmarks/reference_world_eval.sh OUT_DIR [NUM_IMAGES] [DEVICE]
set -euo pipefail
out=${1:?output folder}; n=${2:-1000}; device=${3:-cuda}
qlip="python3 -m qlip.cli"
common=(--model reference --device "$device" --prompts heldout --num-images "$n" --batch-size 250 --steps 25 --guidance 4)
mkdir -p "$out"
timed() { local label=$1; shift; local start=$SECONDS; "$@"; echo "$label: $((SECONDS - start)) s" | tee -a "$out/timings.txt"; }
timed "quantize w8a8" $qlip quantize --model reference --device "$device" --method rtn --wbits 8 --abits 8 --guidance 4 --out "$out/w8a8"
timed "quantize w4a8" $qlip quantize --model reference --device "$device" --method rtn --wbits 4 --abits 8 --guidance 4 --out "$out/w4a8"
timed "eval fp" $qlip eval "${common[@]}" --label FP --out "$out/fp"
timed "eval w8a8" $qlip eval "${common[@]}" --quantized "$out/w8a8" --label "RTN W8A8" --reference-run "$out/fp" --out "$out/eval_w8a8"
timed "eval w4a8" $qlip eval "${common[@]}" --quantized "$out/w4a8" --label "RTN W4A8" --reference-run "$out/fp" --out "$out/eval_w4a8"
python3 -m qlip.evaluation.report "$out/fp" "$out/eval_w8a8" "$out/eval_w4a8" | tee "$out/summary.md"
