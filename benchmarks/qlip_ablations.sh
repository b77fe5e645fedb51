#!/usr/bin/env bash
# Issue 12's ablations on the reference world, next to QLIP of a finished
# benchmarks/qlip_first_result.sh run folder OUT (it needs OUT/<BASE>, the bank model; OUT/eval_fp;
# OUT/<WORK>, QLIP's work folder, whose FP stages are copied, not recomputed; the fixed-bits evals
# OUT/eval_<MTAG>_w4a<bits> for the λ plot):
#   bash benchmarks/qlip_ablations.sh OUT [N=1000] [DEVICE=cuda]
# Every row is one `qlip train-qlip` with one thing changed from QLIP's settings, then one
# `qlip eval` (the same prompts, seeds and steps as the first result's; --batch-mode per_image;
# --reference-run OUT/eval_fp):
#   labels    T2Q's label (the paper's Table 3): realism, image_text, sensitivity (giqa is QLIP);
#   criteria  the selection criterion (Table S3): complexity (T2C: the FP image's mean gradient
#             magnitude, learnt from the text by T2Q's network), length (token count);
#   q2b       Q2B's inputs (Table 4): --variant pq (p_q alone, between the set's lowest and
#             highest option), pq_ph, pq_pm (full is QLIP);
#   bits      the option set (Table S4): BIT_SETS (default "8,16 6,8,16,32"; the variant follows
#             the option count: pq, full, four); QLIP's own set is QLIP; the bank must hold every
#             option (on this world's range, e.g. SET=4,5,6 BIT_SETS="4,6 4,5,6,8");
#   lam       λ, the bit penalty: LAMS (default "0.02 0.05 0.2 0.5"; QLIP's is 0.1);
#   retrain   the same settings trained again with other --q2b-seed values (SEEDS, default
#             "1 2"), RETRAIN_OPTIONS the row's own train-qlip options (e.g. "--variant pq_ph"),
#             RETRAIN_TAG its name (rows retrain_<tag>_s<seed>): how far training alone moves
#             a policy (the nineteenth session saw 0.73 dB of PSNR between two trainings).
# ABLATIONS picks them (default "labels criteria q2b bits lam"; retrain only when named), LABELS the labels' rows (default
# "realism image_text sensitivity", started in that order). Each row trains in its own work
# folder, a copy of WORK's FP stages (a work folder is locked by one job), JOBS at a time.
# Then benchmarks/qlip_ablations_summary.py writes OUT/ablations.md (every row's SROCC, PLCC,
# FAB, FID, PSNR to FP and alignment with intervals, and `qlip compare` against QLIP) and
# OUT/ablations_lambda.png (FAB against quality, QLIP's λ curve beside the fixed bits).
# Settings: SET (QLIP's option set, default 8,16,32), WORK (default qlip_work), BASE (default
# q_qd_w4), MTAG/MNAME (qd / Q-Diffusion; ptqd / PTQD), TRAIN_EXTRA, EVAL_EXTRA, N_T2Q, STEPS.
# Every step is skipped when its result exists, so a call cut by a timeout resumes.
# Smoke test (CPU, 2026-12-03: every row trained and evaluated, 14-20 s each; the summary and
# the plot written), on a first-result smoke folder made with SETS=8,16,32 FIXED="32 8 6":
#   STEPS=2 N_T2Q=40 TRAIN_EXTRA="--q2b-prompts 4 --q2b-iters 4 --t2q-iters 50 --chunk 16"
#   EVAL_EXTRA="--bootstrap-resamples 20" COMPARE_RESAMPLES=20 LAMS=0.5 JOBS=2
#   bash benchmarks/qlip_ablations.sh OUT 16 cpu
set -uo pipefail
out=${1:?output folder of qlip_first_result.sh}; n=${2:-1000}; device=${3:-cuda}
jobs=${JOBS:-4}; steps=${STEPS:-25}; n_t2q=${N_T2Q:-10000}
set_bits=${SET:-8,16,32}; t=${set_bits//,/-}; base=${BASE:-q_qd_w4}; work=${WORK:-qlip_work}
mtag=${MTAG:-qd}; mname=${MNAME:-Q-Diffusion}; groups=${ABLATIONS:-labels criteria q2b bits lam}
lams=${LAMS:-0.02 0.05 0.2 0.5}
# shellcheck source=benchmarks/qlip_folder.sh
source "$(dirname "$0")/qlip_folder.sh"
require "PHASE=quantize, train, eval" "$base/quant_state.safetensors" "$work" eval_fp/metrics.json

rows=()  # "name|bits|train-qlip options"
for group in $groups; do
    case "$group" in
        labels) for l in ${LABELS:-realism image_text sensitivity}; do
                    rows+=("label_$l|$set_bits|--label $l"); done ;;
        criteria) for l in complexity length; do rows+=("criterion_$l|$set_bits|--label $l"); done ;;
        # p_q alone chooses between two options: the set's lowest and highest
        q2b) rows+=("q2b_pq|${set_bits%%,*},${set_bits##*,}|--variant pq")
             for v in pq_ph pq_pm; do rows+=("q2b_$v|$set_bits|--variant $v"); done ;;
        # the variant follows the option count: pq for two, full for three, four for four
        bits) for b in ${BIT_SETS:-8,16 6,8,16,32}; do
                  c=$(( $(tr -cd , <<< "$b" | wc -c) + 1 ))
                  case $c in 2) v=pq ;; 3) v=full ;; 4) v=four ;;
                      *) echo "BIT_SETS: $b has $c options; Q2B takes 2 to 4" >&2; exit 2 ;; esac
                  rows+=("bits_${b//,/-}|$b|--variant $v")
              done ;;
        lam) for l in $lams; do rows+=("lam_$l|$set_bits|--lam $l"); done ;;
        retrain) for sd in ${SEEDS:-1 2}; do
                     rows+=("retrain_${RETRAIN_TAG:-qlip}_s$sd|$set_bits|--q2b-seed $sd ${RETRAIN_OPTIONS:-}")
                 done ;;
        *) echo "ABLATIONS: unknown group $group (labels criteria q2b bits lam retrain)" >&2; exit 2 ;;
    esac
done

row() {  # row NAME BITS OPTIONS: train (in a copy of WORK's FP stages), then evaluate
    local name=$1 bits=$2 options=$3 dir="$out/qlip_work_abl_$1"
    if [ ! -e "$out/q_abl_$name/qlip.json" ]; then
        fp_stages_copy "$out/$work" "$dir"
        # shellcheck disable=SC2086
        timed "train-qlip abl $name" $qlip train-qlip "${train[@]}" --work-dir "$dir" \
            --quantized "$out/$base" --bits "$bits" $options --out "$out/q_abl_$name" \
            > "$out/logs/train_abl_$name.txt" 2>&1 || return 1
    fi
    evaluate "abl_$name" "$mname W4 + QLIP A{$bits}, $name" --quantized "$out/q_abl_$name"
}
for spec in "${rows[@]}"; do
    IFS='|' read -r name bits options <<< "$spec"
    throttle; row "$name" "$bits" "$options" &
done
wait

names=$(for spec in "${rows[@]}"; do echo "${spec%%|*}"; done)
# shellcheck disable=SC2086
python3 "$(dirname "$0")/qlip_ablations_summary.py" "$out" --qlip "qlip_$t" --mtag "$mtag" \
    --device "$device" --resamples "${COMPARE_RESAMPLES:-2000}" --jobs "$jobs" $names
grep -h "exit [1-9]" "$out/timings.txt" 2>/dev/null && echo "some steps failed: see $out/logs" >&2
exit 0
