# issue 12, on the bank model rebuilt on the H100 (twenty-second and twenty-third sessions,
# runs/qfr): QLIP A{4,5,6} (GIQA) and its random control (b), beside FP, all three on this CPU so
# that the pair is paired on one device
set -u
cd /work/main/runs/s23cpu
source /work/main/.venv/bin/activate
export OMP_NUM_THREADS=2
common=(--model reference --device cpu --prompts heldout --num-images 2000 --batch-size 100 --steps 25 --guidance 4 --batch-mode per_image)
t0=$SECONDS
[ -e eval_fp/metrics.json ] || python -m qlip.cli eval "${common[@]}" --label FP --out eval_fp > fp.log 2>&1
echo "fp $((SECONDS-t0)) s" >> timings.txt
[ -e eval_qlip/metrics.json ] || python -m qlip.cli eval "${common[@]}" --label "QLIP A{4,5,6} (GIQA), rebuilt bank" --quantized /work/main/runs/qfr/q_qlip_4-5-6 --reference-run eval_fp --out eval_qlip > qlip.log 2>&1
echo "qlip $((SECONDS-t0)) s" >> timings.txt
[ -e eval_random/metrics.json ] || python -m qlip.cli eval "${common[@]}" --label "random matched to QLIP A{4,5,6}, rebuilt bank" --quantized /work/main/runs/qfr/q_qd_w4 --policy random-matched --bits-from eval_qlip --policy-seed 0 --reference-run eval_fp --out eval_random > random.log 2>&1
echo "random $((SECONDS-t0)) s" >> timings.txt
python -m qlip.cli compare eval_qlip eval_random --resamples 2000 --json compare_qlip_vs_random.json > compare_qlip_vs_random.md 2> compare.log
echo "compare $((SECONDS-t0)) s" >> timings.txt
