# issue 12, control (a) on the bank model rebuilt on the H100 (runs/qfr): Q2B trained without the
# prompt (`train-qlip --ignore-prompt`, QLIP {4,5,6}'s training settings, on this CPU from a copy
# of QLIP's work folder without its Q2B stage), evaluated beside the FP, QLIP, random and fixed
# evals of ../cpu_2000_rebuild_random and ../cpu_2000_rebuild_fixed (same prompts, seeds and
# settings), then paired with QLIP
set -u
cd /work/main
source .venv/bin/activate
export OMP_NUM_THREADS=2
t0=$SECONDS
W=runs/s24cpu/qlip_work_timestep_4-5-6
if [ ! -d "$W" ]; then
    mkdir -p "$W" && for st in runs/qfr/qlip_work/*/; do
        case "$(basename "$st")" in q2b_*) ;; *) cp -a "$st" "$W/" ;; esac
    done
fi
[ -e runs/s24cpu/q_timestep_4-5-6/qlip.json ] || python -m qlip.cli train-qlip --model reference \
    --device cpu --num-prompts 10000 --steps 25 --guidance 4 --batch-size 250 --chunk 1000 \
    --redo-stale --work-dir "$W" --quantized runs/qfr/q_qd_w4 --bits 4,5,6 --ignore-prompt \
    --out runs/s24cpu/q_timestep_4-5-6 > runs/s24cpu/train_timestep.log 2>&1
echo "train $((SECONDS-t0)) s" >> runs/s24cpu/timings.txt
cd runs/s23cpu
common=(--model reference --device cpu --prompts heldout --num-images 2000 --batch-size 100 --steps 25 --guidance 4 --batch-mode per_image)
[ -e eval_timestep/metrics.json ] || python -m qlip.cli eval "${common[@]}" --label "(a) timestep-only Q2B {4,5,6}, rebuilt bank" --quantized /work/main/runs/s24cpu/q_timestep_4-5-6 --reference-run eval_fp --out eval_timestep > timestep.log 2>&1
echo "eval $((SECONDS-t0)) s" >> /work/main/runs/s24cpu/timings.txt
python -m qlip.cli compare eval_qlip eval_timestep --resamples 2000 --json compare_qlip_vs_timestep.json > compare_qlip_vs_timestep.md 2>> compare.log
echo "compare $((SECONDS-t0)) s" >> /work/main/runs/s24cpu/timings.txt
