#!/usr/bin/env bash
# Issue 13's DGQ table on the reference world: W8A8, W4A8, W8A6, W4A6, W4A5, W4A4 for DGQ with
# g = 1, 8, 16 groups and for Q-Diffusion, on N held-out prompts and seeds, every eval with the
# yardstick's 95% intervals and fidelity to FP (--reference-run), paired comparisons
# (`qlip compare`) in the summary, and the calibration wall times (OUT/timings.txt).
#
# On one H200, each phase at most PHASE_SECONDS (default 510 s, under 9 minutes):
#   PHASE=quantize bash benchmarks/dgq_eval.sh OUT [N=2000] [DEVICE=cuda]   # run until "done"
#   PHASE=eval     bash benchmarks/dgq_eval.sh OUT [N=2000] [DEVICE=cuda]   # run until "done"
#   PHASE=summary  bash benchmarks/dgq_eval.sh OUT [N=2000] [DEVICE=cuda]   # run until "done"
#   PHASE=qlip     bash benchmarks/dgq_eval.sh OUT [N=2000] [DEVICE=cuda]   # the QLIP-on-DGQ row:
#                  `qlip train-qlip` on DGQ W4 g=16 (made first if missing), then its eval
# Every job of a phase runs under `timeout` with the phase's remaining time, so a phase ends in
# time and leaves resumable state; run the same phase again until it prints "PHASE ... done"
# (finished models and evals are skipped, reconstructions resume per unit, evals per image, a
# cut DGQ activation calibration starts again: about a minute).
#
# Models (activation bank {4,5,6,8}: one calibration serves every A-setting of a row):
#   qd_w4, qd_w8            Q-Diffusion, reconstruction (BRECQ/AdaRound) + EMA activations
#   dgq_w4_g16, dgq_w8_g16  DGQ, the `dgq` preset's reconstruction + grouped activations, g = 16
#   dgq_wX_g1, dgq_wX_g8    DGQ on dgq_wX_g16's weights (--weights-from): activations only
# quantize: the FP eval, the four reconstructions and then the four activation-only DGQ
#   calibrations, concurrently; Q-Diffusion's evals start as soon as its model is ready.
# eval: every eval left (18 DGQ rows, Q-Diffusion's if not finished), JOBS at a time; no new eval
#   starts in the last EVAL_TAIL seconds (default 240) of the phase.
# All calibrations share one capture (OUT/cache/calibration.safetensors, 65 MB, rebuilt in
# seconds if missing: leave it out of what is carried between machines).
# QUANT_EXTRA adds options to every `qlip quantize` (W8_EXTRA to the W8 ones only, e.g.
# "--recon-iters 0" to skip their reconstruction when time is short), EVAL_EXTRA to every `qlip eval`,
# COMPARE_RESAMPLES sets the summary's paired bootstrap (default 500). A CPU smoke run:
#   QUANT_EXTRA="--recon-iters 2 --recon-samples 8 --calib-num 2 --calib-steps 3
#   --calib-kept-steps 3" EVAL_EXTRA="--steps 3 --bootstrap-resamples 20" COMPARE_RESAMPLES=20
#   JOBS=2 PHASE_SECONDS=100000 PHASE=all bash benchmarks/dgq_eval.sh /tmp/dgq-smoke 8 cpu
set -uo pipefail
out=${1:?output folder}; n=${2:-2000}; device=${3:-cuda}; phase=${PHASE:-all}; jobs=${JOBS:-6}
deadline=$((SECONDS + ${PHASE_SECONDS:-510})); eval_tail=${EVAL_TAIL:-240}
qlip="python3 -m qlip.cli"
# shellcheck disable=SC2206
common=(--model reference --device "$device" --prompts heldout --num-images "$n" --batch-size 250
        --steps 25 --guidance 4 ${EVAL_EXTRA:-})
# shellcheck disable=SC2206
quant=(--model reference --device "$device" --guidance 4 --abits 8 --abits-options 4,5,6,8
       --calib-cache "$out/cache/calibration.safetensors" --seed 0 ${QUANT_EXTRA:-})
mkdir -p "$out/logs" "$out/cache"
cores=$(nproc)
export OMP_NUM_THREADS=$(( cores / jobs > 0 ? cores / jobs : 1 ))  # no oversubscription

# shellcheck source=benchmarks/timed.sh
source "$(dirname "$0")/timed.sh"
left() { echo $((deadline - SECONDS)); }
bounded() {  # bounded COMMAND...: COMMAND under the phase's remaining time
    local rest; rest=$(left)
    [ "$rest" -gt 5 ] || return 124
    timeout --signal=INT --kill-after=20 "$rest" "$@"
}
ready() { [ -e "$out/q_$1/quant_config.json" ]; }  # written last by `qlip quantize`
quantize() {  # quantize NAME [qlip quantize options...]: skipped when OUT/q_NAME is complete
    local name=$1; shift
    ready "$name" && return 0
    timed "quantize $name" bounded $qlip quantize "${quant[@]}" --out "$out/q_$name" "$@" \
        > "$out/logs/q_$name.txt" 2>&1
}
evaluate() {  # evaluate NAME LABEL MODEL ABITS: skipped when its metrics.json exists
    local name=$1 label=$2 model=$3 abits=$4
    [ -e "$out/eval_$name/metrics.json" ] && return 0
    timed "eval $name" bounded $qlip eval "${common[@]}" --label "$label" \
        --reference-run "$out/eval_fp" --quantized "$out/q_$model" --abits "$abits" \
        --out "$out/eval_$name" > "$out/logs/eval_$name.txt" 2>&1
}
throttle() {  # wait while JOBS jobs run
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
}
fp_ready() { [ -e "$out/eval_fp/generated.jsonl" ] && [ -e "$out/eval_fp/metrics.json" ]; }
settings() {  # the A-settings of a weight width
    if [ "$1" = 8 ]; then echo "8 6"; else echo "8 6 5 4"; fi
}
qd_evals() {  # Q-Diffusion W$1's evals, once its model and the FP eval are ready
    while ! fp_ready && [ "$(left)" -gt 5 ]; do sleep 2; done
    ready "qd_w$1" || return 0
    for a in $(settings "$1"); do
        evaluate "qd_w$1a$a" "Q-Diffusion W$1A$a" "qd_w$1" "$a" &
    done
    wait
}
all_evals() {  # the name of every eval of the table
    for w in 4 8; do
        for a in $(settings "$w"); do echo "qd_w${w}a$a dgq_w${w}a${a}_g16 dgq_w${w}a${a}_g8 dgq_w${w}a${a}_g1"; done
    done
}
launch() {  # launch NAME LABEL MODEL ABITS: start an eval in the background unless it is done;
    # fails (the eval is left for the next run) when its model is missing or the phase ends soon
    [ -e "$out/eval_$1/metrics.json" ] && return 0
    ready "$3" && [ "$(left)" -gt "$eval_tail" ] || return 1
    throttle
    evaluate "$@" &
}
dgq() {  # dgq W G [options]: DGQ W-bit weights with G groups
    local w=$1 g=$2; shift 2
    quantize "dgq_w${w}_g$g" --method dgq --wbits "$w" --groups "$g" "$@"
}

if [ "$phase" = quantize ] || [ "$phase" = all ]; then
    fp_ready || (timed "eval fp" bounded $qlip eval "${common[@]}" --label FP \
        --out "$out/eval_fp" > "$out/logs/eval_fp.txt" 2>&1) &
    for w in 4 8; do
        # shellcheck disable=SC2086
        extra=$([ "$w" = 8 ] && echo ${W8_EXTRA:-})
        # shellcheck disable=SC2086
        (quantize "qd_w$w" --method qdiffusion --wbits "$w" $extra; qd_evals "$w") &
        # shellcheck disable=SC2086
        (dgq "$w" 16 $extra && for g in 1 8; do
             dgq "$w" "$g" --weights-from "$out/q_dgq_w${w}_g16" &
         done
         wait) &
    done
    wait
    missing=0
    for name in qd_w4 qd_w8 dgq_w4_g16 dgq_w8_g16 dgq_w4_g1 dgq_w4_g8 dgq_w8_g1 dgq_w8_g8; do
        ready "$name" || { echo "not finished: q_$name" >&2; missing=1; }
    done
    fp_ready || { echo "not finished: eval_fp" >&2; missing=1; }
    [ "$missing" = 0 ] && echo "PHASE quantize done" || echo "run PHASE=quantize again" >&2
fi

if [ "$phase" = eval ] || [ "$phase" = all ]; then
    if ! fp_ready; then
        echo "the FP eval is not finished: run PHASE=quantize again first" >&2; exit 1
    fi
    todo=0
    for w in 4 8; do
        for a in $(settings "$w"); do
            for g in 16 8 1; do
                launch "dgq_w${w}a${a}_g$g" "DGQ W${w}A$a g=$g" "dgq_w${w}_g$g" "$a" || todo=1
            done
            launch "qd_w${w}a$a" "Q-Diffusion W${w}A$a" "qd_w$w" "$a" || todo=1
        done
    done
    wait
    for name in $(all_evals); do [ -e "$out/eval_$name/metrics.json" ] || todo=1; done
    [ "$todo" = 0 ] && echo "PHASE eval done" || echo "evals left: run PHASE=eval again" >&2
fi

if [ "$phase" = summary ] || [ "$phase" = all ]; then  # comparisons are kept: a cut run resumes
    bounded python3 benchmarks/dgq_summary.py "$out" "$device" \
        && echo "PHASE summary done" || echo "run PHASE=summary again" >&2
fi

if [ "$phase" = qlip ]; then
    # QLIP on DGQ (T2Q/Q2B trained on dgq_w4_g16's bank {4,5,6,8}, Q2B bits 4,6,8); not part of
    # the table's phases, and runs on a fresh machine too: the FP eval and DGQ W4 g=16 are made
    # first where they are missing (concurrently). Each prompt at its own bits (--batch-mode
    # per_image): at the eval's batch of 250, `max` would run nearly every layer at the batch's
    # highest choice. Training samples as the first result did (25 steps, guidance 4, batches of
    # 250); QLIP_TRAIN_ARGS adds `qlip train-qlip` options (e.g. --num-prompts).
    fp_ready || (timed "eval fp" bounded $qlip eval "${common[@]}" --label FP \
        --out "$out/eval_fp" > "$out/logs/eval_fp.txt" 2>&1) &
    dgq 4 16
    wait
    # the fixed rows QLIP is compared with, on the same calibration (already there when the
    # table ran in this folder), alongside the training
    if ready dgq_w4_g16 && fp_ready; then
        for a in 4 6 8; do evaluate "dgq_w4a${a}_g16" "DGQ W4A$a g=16" dgq_w4_g16 "$a" & done
    fi
    if ready dgq_w4_g16 && fp_ready && [ ! -e "$out/q_dgq_w4_g16_qlip/qlip.json" ]; then
        # shellcheck disable=SC2086
        timed "train-qlip dgq_w4_g16" bounded $qlip train-qlip --model reference \
            --device "$device" --quantized "$out/q_dgq_w4_g16" --bits 4,6,8 --steps 25 \
            --guidance 4 --batch-size 250 --chunk 1000 --no-progress \
            --out "$out/q_dgq_w4_g16_qlip" ${QLIP_TRAIN_ARGS:-} > "$out/logs/qlip_train.txt" 2>&1
    fi
    [ -e "$out/q_dgq_w4_g16_qlip/qlip.json" ] && [ ! -e "$out/eval_qlip_dgq_w4_g16/metrics.json" ] \
        && timed "eval qlip_dgq_w4_g16" bounded $qlip eval "${common[@]}" \
            --label "QLIP on DGQ W4 g=16" --batch-mode per_image --reference-run "$out/eval_fp" \
            --quantized "$out/q_dgq_w4_g16_qlip" --out "$out/eval_qlip_dgq_w4_g16" \
            > "$out/logs/eval_qlip_dgq_w4_g16.txt" 2>&1
    wait
    [ -e "$out/eval_qlip_dgq_w4_g16/metrics.json" ] && echo "PHASE qlip done" \
        || echo "run PHASE=qlip again" >&2
fi
grep -h "exit [1-9]" "$out/timings.txt" 2>/dev/null && echo "(in timings.txt) steps that failed or were cut \
by a deadline (exit 124): see $out/logs; a cut step resumes when its phase runs again" >&2
exit 0
