#!/usr/bin/env bash
# Issue 11's first result on the reference world: Q-Diffusion W4 + QLIP against fixed bits, for
# the paper's option set {8,16,32} and for {4,5,6} (this model's activation cliff lies between 4
# and 5 bits), on N held-out prompts with the yardstick's intervals. On one GPU:
#   PHASE=quantize bash benchmarks/qlip_first_result.sh OUT [N=1000] [DEVICE=cuda]  # FP eval + W4 model
#   PHASE=train_a  bash benchmarks/qlip_first_result.sh OUT [N=1000] [DEVICE=cuda]  # QLIP A{8,16,32}
#   PHASE=train_b  bash benchmarks/qlip_first_result.sh OUT [N=1000] [DEVICE=cuda]  # QLIP A{4,5,6}
#   PHASE=eval     bash benchmarks/qlip_first_result.sh OUT [N=1000] [DEVICE=cuda]  # 6 fixed + 2 QLIP evals
#   PHASE=summary  bash benchmarks/qlip_first_result.sh OUT [N=1000] [DEVICE=cuda]  # compare, plots, export
# (PHASE=train runs train_a and train_b, PHASE=all every phase in turn.) Every phase resumes: run it again after a timeout and it
# continues (the reconstruction per unit, `qlip train-qlip` per stage, chunk and Q2B checkpoint,
# an eval per image; finished steps are skipped).
#
# quantize: the FP eval, one Q-Diffusion W4 calibration with the bank {4,5,6,8,16,32} and QLIP's
#           FP stages (`qlip train-qlip --stop-after trajectories`: T2Q data, labels, T2Q, Q2B's
#           FP trajectories, none of which needs the quantized model), all at once.
# train_a/b: `qlip train-qlip` for {8,16,32} / {4,5,6} (GIQA labels, N_T2Q FP generations of
#           held-out-free training prompts), both at once; {4,5,6} works in a copy of the FP
#           stages of {8,16,32}'s work folder;
#           each writes a copy of the model plus qlip.json to OUT/q_qlip_<set>.
# eval:     fixed A32, A16, A8, A6, A5, A4 and the two QLIPs (each prompt at its own bits:
#           --batch-mode per_image), every eval with --reference-run FP, JOBS at a time; then,
#           alone on the device, QLIP's cost per image against fixed bits (benchmarks/qlip_cost.py
#           -> OUT/qlip_cost_<set>.json).
# summary:  OUT/summary.md (table with intervals, FAB, BitOPs, T2Q SROCC/PLCC, paired comparisons
#           of each QLIP against its neighbouring fixed settings), OUT/figures_<set>/*.png
#           (`qlip plot-qlip`), OUT/export/*.tar.
# On the lent GPU (30 device-minutes a session, 10 a call, the machine and its runs/ gone 30 s
# after a call), as run on the H200 (docs/results/qlip/h200_third_run): call 1 = PHASE=quantize
# (314 s) then PHASE=train under `timeout` (cut, resumes from its Q2B checkpoints); call 2 =
# PHASE=train again (~150 s at 500 Q2B iterations) and PHASE=eval JOBS=8 (8 evals at once,
# 252-264 s) with the cost benchmark (137 s at --batches 2, which did not resolve the cost:
# next time COST_EXTRA='--batch-sizes 16 --batches 2 --pairs 10', QLIP/replay in adjacent
# pairs); call 3 = PHASE=summary (~60 s).
# Issue each call within the 30 s idle window. End EVERY call with
#   MODELS=1 bash benchmarks/collect_records.sh runs/qfr $OUT
# and unpack what comes back under runs/qfr here; then a call whose machine is new starts with
# the models (carry ["runs/qfr", ".whl"]) instead of from the calibration.
# Smoke test (CPU): STEPS=2 N_T2Q=40 TRAIN_EXTRA="--q2b-prompts 4 --q2b-iters 4 --t2q-iters 50
#   --chunk 16" QUANT_EXTRA="--recon-iters 2 --recon-samples 8 --calib-num 2 --calib-steps 2
#   --calib-kept-steps 2" EVAL_EXTRA="--bootstrap-resamples 20" PLOT_EXTRA="--num-prompts 20
#   --curve-scenes 4 --example-scenes 1" COMPARE_RESAMPLES=20 bash benchmarks/qlip_first_result.sh OUT 16 cpu
# Issue 12's main tables run the same phases with other settings, one run folder per method:
#   METHOD=ptqd BANK=4,5,6,8,10,16,32 SETS="8,16,32 6,8,10 4,5,6" FIXED="32 16 10 8 6 5 4" \
#       PHASE=... bash benchmarks/qlip_first_result.sh runs/tables_ptqd 2000 cuda
# (METHOD: qdiffusion or ptqd; BANK: the activation bank calibrated once; SETS: QLIP's option
# sets, each within BANK; FIXED: the fixed activation bits evaluated. Defaults: this script's
# first result.) The folders: q_<tag>_w4 (tag qd or ptqd), eval_<tag>_w4a<bits>, q_qlip_<set>.
set -uo pipefail
out=${1:?output folder}; n=${2:-1000}; device=${3:-cuda}; phase=${PHASE:-all}; jobs=${JOBS:-4}
steps=${STEPS:-25}; n_t2q=${N_T2Q:-10000}
method=${METHOD:-qdiffusion}; bank=${BANK:-4,5,6,8,16,32}; fixed=${FIXED:-32 16 8 6 5 4}
case "$method" in qdiffusion) mtag=qd; mname=Q-Diffusion ;; ptqd) mtag=ptqd; mname=PTQD ;;
    *) echo "METHOD must be qdiffusion or ptqd; got $method" >&2; exit 2 ;; esac
model="$out/q_${mtag}_w4"
# the model's default bits (what it runs at without a policy): 8 where the bank has it, else its top
case ",$bank," in *,8,*) default_abits=8 ;; *) default_abits=${bank##*,} ;; esac
qlip="python3 -m qlip.cli"
# shellcheck disable=SC2206
common=(--model reference --device "$device" --prompts heldout --num-images "$n" --batch-size 250
        --steps "$steps" --guidance 4 ${EVAL_EXTRA:-})
# shellcheck disable=SC2206
quant=(--model reference --device "$device" --guidance 4 ${QUANT_EXTRA:-})
# shellcheck disable=SC2206
train=(--model reference --device "$device" --num-prompts "$n_t2q"
       --steps "$steps" --guidance 4 --batch-size 250 --chunk 1000 --no-progress ${TRAIN_EXTRA:-})
# shellcheck disable=SC2206
sets=(${SETS:-8,16,32 4,5,6})
mkdir -p "$out/logs"
cores=$(nproc)
export OMP_NUM_THREADS=$(( cores / jobs > 0 ? cores / jobs : 1 ))

# shellcheck source=benchmarks/timed.sh
source "$(dirname "$0")/timed.sh"
tag() { echo "${1//,/-}"; }  # 8,16,32 -> 8-16-32

if [ "$phase" = quantize ] || [ "$phase" = all ]; then
    [ -e "$out/eval_fp/metrics.json" ] || \
        (timed "eval fp" $qlip eval "${common[@]}" --label FP --out "$out/eval_fp" \
             > "$out/logs/eval_fp.txt" 2>&1) &
    [ -e "$model/quant_state.safetensors" ] || \
        timed "quantize ${mtag}_w4" $qlip quantize "${quant[@]}" --method "$method" --wbits 4 \
            --abits "$default_abits" --abits-options "$bank" --seed 0 --out "$model" \
            > "$out/logs/q_${mtag}_w4.txt" 2>&1 &
    timed "fp stages" $qlip train-qlip "${train[@]}" --work-dir "$out/qlip_work" --stop-after trajectories \
        > "$out/logs/fp_stages.txt" 2>&1
    wait
fi

case "$phase" in
    train_a) train_sets=("${sets[0]}") ;;
    train_b) train_sets=("${sets[1]}") ;;
    train|all) train_sets=("${sets[@]}") ;;
    *) train_sets=() ;;
esac
if [ "${#train_sets[@]}" -gt 0 ]; then
    if [ ! -e "$model/quant_state.safetensors" ]; then
        echo "the W4 model is not quantized: run PHASE=quantize first" >&2; exit 1
    fi
    # The sets train at once, each in its own work folder (a work folder is locked by one job):
    # the second starts from a copy of the first's FP stages, whose caches are fingerprinted by
    # content, so the copy is reused, not recomputed.
    for bits in "${train_sets[@]}"; do
        t=$(tag "$bits")
        # trained: its policy and its state (records.tgz brings qlip.json back without the state)
        [ -e "$out/q_qlip_$t/qlip.json" ] && [ -e "$out/q_qlip_$t/quant_state.safetensors" ] && continue
        work="$out/qlip_work"
        if [ "$bits" != "${sets[0]}" ]; then
            work="$out/qlip_work_$t"
            fp_stages_copy "$out/qlip_work" "$work"
        fi
        timed "train-qlip $t" $qlip train-qlip "${train[@]}" --work-dir "$work" \
            --quantized "$model" --bits "$bits" --out "$out/q_qlip_$t" \
            > "$out/logs/train_$t.txt" 2>&1 &
    done
    wait
fi

if [ "$phase" = eval ] || [ "$phase" = all ]; then
    if [ ! -e "$out/eval_fp/metrics.json" ]; then
        echo "the FP eval is not finished: run PHASE=quantize again first" >&2; exit 1
    fi
    for a in $fixed; do
        throttle; evaluate "${mtag}_w4a$a" "$mname W4A$a" --quantized "$model" --abits "$a" &
    done
    for bits in "${sets[@]}"; do
        t=$(tag "$bits")
        if [ ! -e "$out/q_qlip_$t/qlip.json" ]; then
            echo "QLIP {$bits} is not trained: run PHASE=train_a / train_b first" >&2; continue
        fi
        throttle; evaluate "qlip_$t" "$mname W4 + QLIP A{$bits}" --quantized "$out/q_qlip_$t" \
            --batch-mode per_image &
    done
    wait
    for bits in ${COST_SETS:-${sets[0]}}; do  # alone on the device: nothing else shares it
        t=$(tag "$bits")
        [ -e "$out/q_qlip_$t/qlip.json" ] && [ ! -e "$out/qlip_cost_$t.json" ] || continue
        timed "cost $t" python3 "$(dirname "$0")/qlip_cost.py" "$out/q_qlip_$t" --device "$device" \
            --steps "$steps" --out "$out/qlip_cost_$t.json" ${COST_EXTRA:-} \
            > "$out/logs/cost_$t.txt" 2>&1
    done
fi

if [ "$phase" = summary ] || [ "$phase" = all ]; then
    for bits in "${sets[@]}"; do
        t=$(tag "$bits")
        [ -e "$out/q_qlip_$t/qlip.json" ] || continue
        [ -e "$out/figures_$t/figures.json" ] || \
            timed "plot-qlip $t" $qlip plot-qlip --model reference --device "$device" \
                --quantized "$out/q_qlip_$t" --out "$out/figures_$t" --num-prompts "$n" \
                --guidance 4 ${PLOT_EXTRA:-} > "$out/logs/plot_$t.txt" 2>&1
    done
    FIXED="$fixed" SETS="${sets[*]}" MTAG="$mtag" \
        python3 "$(dirname "$0")/qlip_first_result_summary.py" "$out" "$device"
fi
grep -h "exit [1-9]" "$out/timings.txt" 2>/dev/null && echo "some steps failed: see $out/logs" >&2
exit 0
