#!/usr/bin/env bash
# The RTN W8A5 anomaly at 2,000 held-out prompts on the GPU (about 4 minutes on the H200): RTN W8
# with the yardstick's bank, the FP eval and the A5/A6 evals (the yardstick's commands, so the
# same images), then benchmarks/anomaly_analysis.py into OUT (anomaly.json, anomaly_grid.png).
#   OUT=docs/results/yardstick/h200_2000 bash benchmarks/anomaly_rtn_2000.sh [WORK=runs/a]
set -uo pipefail
o=${WORK:-runs/a}; mkdir -p "$o" "$OUT"
common="--model reference --device cuda --prompts heldout --num-images 2000 --batch-size 250 --steps 25 --guidance 4 --bootstrap-resamples 20"
python3 -m qlip.cli quantize --model reference --device cuda --guidance 4 --method rtn --wbits 8 --abits 8 --abits-options 4,5,6,8,16 --seed 0 --out $o/q_rtn_w8 > $o/q.txt 2>&1 &
python3 -m qlip.cli eval $common --label FP --out $o/eval_fp > $o/fp.txt 2>&1 &
wait
for a in 5 6; do python3 -m qlip.cli eval $common --label "RTN W8A$a" --reference-run $o/eval_fp --quantized $o/q_rtn_w8 --abits $a --out $o/eval_rtn_w8a$a > $o/a$a.txt 2>&1 & done
wait
tail -n 2 $o/*.txt | cut -c1-250
python3 benchmarks/anomaly_analysis.py $OUT $o/eval_fp $o/eval_rtn_w8a5 $o/eval_rtn_w8a6 > /dev/null
ls $OUT
