export PYTHONPATH=$PWD/.site:$PWD/src
o=runs/a; mkdir -p $o
common="--model reference --device cuda --prompts heldout --num-images 2000 --batch-size 250 --steps 25 --guidance 4 --bootstrap-resamples 20"
python3 -m qlip.cli quantize --model reference --device cuda --guidance 4 --method rtn --wbits 8 --abits 8 --abits-options 4,5,6,8,16 --seed 0 --out $o/q_rtn_w8 > $o/q.txt 2>&1 &
python3 -m qlip.cli eval $common --label FP --out $o/eval_fp > $o/fp.txt 2>&1 &
wait
for a in 5 6; do python3 -m qlip.cli eval $common --label "RTN W8A$a" --reference-run $o/eval_fp --quantized $o/q_rtn_w8 --abits $a --out $o/eval_rtn_w8a$a > $o/a$a.txt 2>&1 & done
wait
tail -n 2 $o/*.txt | cut -c1-250
python3 benchmarks/anomaly_analysis.py $OUT $o/eval_fp $o/eval_rtn_w8a5 $o/eval_rtn_w8a6 > /dev/null
ls $OUT
