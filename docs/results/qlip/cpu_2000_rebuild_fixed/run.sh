# issue 12, on the bank model rebuilt on the H100 (twenty-second and twenty-third sessions,
# runs/qfr): fixed W4A5 and W4A4 on this CPU, beside the FP, QLIP A{4,5,6} and random-control
# evals of ../cpu_2000_rebuild_random (same prompts, seeds and settings), so that QLIP's row on
# its own range is compared with the fixed settings on one device
set -u
cd /work/main/runs/s23cpu
source /work/main/.venv/bin/activate
export OMP_NUM_THREADS=2
common=(--model reference --device cpu --prompts heldout --num-images 2000 --batch-size 100 --steps 25 --guidance 4 --batch-mode per_image)
t0=$SECONDS
for a in 5 4; do
    [ -e eval_w4a$a/metrics.json ] || python -m qlip.cli eval "${common[@]}" --label "Q-Diffusion W4A$a, rebuilt bank" --quantized /work/main/runs/qfr/q_qd_w4 --abits $a --reference-run eval_fp --out eval_w4a$a > w4a$a.log 2>&1
    echo "w4a$a $((SECONDS-t0)) s" >> timings.txt
done
for a in 5 4; do
    python -m qlip.cli compare eval_qlip eval_w4a$a --resamples 2000 --json compare_qlip_vs_w4a$a.json > compare_qlip_vs_w4a$a.md 2>> compare.log
done
echo "compare fixed $((SECONDS-t0)) s" >> timings.txt
