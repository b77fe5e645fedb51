# issue 12, the length row's random control (b), all on this CPU (FP, length, random): paired on one device
set -u
cd /work/main/runs/s17cpu
source /work/main/.venv/bin/activate
export OMP_NUM_THREADS=2
common=(--model reference --device cpu --prompts heldout --num-images 2000 --batch-size 100 --steps 25 --guidance 4 --batch-mode per_image)
[ -d q_len ] || { mkdir q_len && cp /work/main/runs/s10/q_qd_w4/* q_len/ && cp /work/main/runs/s16/runs/s10/q_abl_criterion_length/qlip.* q_len/; }
t0=$SECONDS
[ -e eval_fp/metrics.json ] || python -m qlip.cli eval "${common[@]}" --label FP --out eval_fp > fp.log 2>&1
echo "fp $((SECONDS-t0)) s" >> timings.txt
[ -e eval_len/metrics.json ] || python -m qlip.cli eval "${common[@]}" --label "QLIP length A{4,5,6}" --quantized q_len --reference-run eval_fp --out eval_len > len.log 2>&1
echo "len $((SECONDS-t0)) s" >> timings.txt
[ -e eval_random/metrics.json ] || python -m qlip.cli eval "${common[@]}" --label "random matched to length A{4,5,6}" --quantized /work/main/runs/s10/q_qd_w4 --policy random-matched --bits-from eval_len --policy-seed 0 --reference-run eval_fp --out eval_random > random.log 2>&1
echo "random $((SECONDS-t0)) s" >> timings.txt
