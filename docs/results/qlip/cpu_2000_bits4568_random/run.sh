# issue 12, the {4,5,6,8} option-set row's random control (b), both on this CPU beside the seventeenth
# session's CPU FP eval (the same 2,000 held-out prompts and seeds): paired on one device
set -u
cd /work/main/runs/s19cpu
source /work/main/.venv/bin/activate
export OMP_NUM_THREADS=2
common=(--model reference --device cpu --prompts heldout --num-images 2000 --batch-size 100 --steps 25 --guidance 4 --batch-mode per_image)
[ -d q_bits4568 ] || { mkdir q_bits4568 && cp /work/main/runs/s10/q_qd_w4/* q_bits4568/ && cp /work/main/runs/s10/q_abl_bits_4-5-6-8/qlip.* q_bits4568/; }
fp=/work/main/runs/s17cpu/eval_fp
t0=$SECONDS
[ -e eval_bits4568/metrics.json ] || python -m qlip.cli eval "${common[@]}" --label "QLIP A{4,5,6,8}" --quantized q_bits4568 --reference-run $fp --out eval_bits4568 > bits4568.log 2>&1
echo "bits4568 $((SECONDS-t0)) s" >> timings.txt
[ -e eval_random/metrics.json ] || python -m qlip.cli eval "${common[@]}" --label "random matched to QLIP A{4,5,6,8}" --quantized /work/main/runs/s10/q_qd_w4 --policy random-matched --bits-from eval_bits4568 --policy-seed 0 --reference-run $fp --out eval_random > random.log 2>&1
echo "random $((SECONDS-t0)) s" >> timings.txt
