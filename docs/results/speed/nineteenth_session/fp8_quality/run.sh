# issue 14, what fp8 does to images: a W4A8 RTN reference model (every option A8, so its Linear
# layers and 1x1 convs can take fp8), evaluated simulated and with --fp8 (those layers through
# torch._scaled_mm in e4m3 on this CPU, the rest simulated), 400 held-out prompts, beside the
# seventeenth session's CPU FP eval; paired with qlip compare
set -u
cd /work/main/runs/s19fp8
source /work/main/.venv/bin/activate
export OMP_NUM_THREADS=2
# (--batch-mode max: a per-image choice runs the real layers in the simulation, so the first
# attempt with per_image, kept in per_image_attempt/, measured the simulation twice)
common=(--model reference --device cpu --prompts heldout --num-images 400 --batch-size 100 --steps 25 --guidance 4 --batch-mode max --quantized q_rtn_w4a8 --reference-run /work/main/runs/s17cpu/eval_fp)
t0=$SECONDS
[ -e eval_fp8/metrics.json ] || python -m qlip.cli eval "${common[@]}" --fp8 --label "RTN W4A8, fp8 A8 GEMMs" --out eval_fp8 > fp8.log 2>&1
echo "fp8 $((SECONDS-t0)) s" >> timings.txt
[ -e eval_sim/metrics.json ] || python -m qlip.cli eval "${common[@]}" --label "RTN W4A8, simulated" --out eval_sim > sim.log 2>&1
echo "sim $((SECONDS-t0)) s" >> timings.txt
qlip compare eval_fp8 eval_sim --resamples 2000 --json compare_fp8_vs_sim.json > compare_fp8_vs_sim.md 2> compare.err
echo "compare $((SECONDS-t0)) s" >> timings.txt
