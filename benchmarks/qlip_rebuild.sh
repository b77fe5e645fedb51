#!/usr/bin/env bash
# Issue 12's bank model and QLIP A{4,5,6} rebuilt on the lent GPU, with the controls that decide
# its item 2, as device calls of at most ~9.5 minutes each (from the repository root on the GPU
# machine, .whl carried; the untracked runs/ of earlier sessions are gone with their checkouts):
#   bash benchmarks/qlip_rebuild.sh "$OUT" 1   # FP eval + the W4 bank model + QLIP's FP stages
#                                              # (benchmarks/qlip_first_result.sh PHASE=quantize),
#                                              # then QLIP {4,5,6}'s training until the limit
#   bash benchmarks/qlip_rebuild.sh "$OUT" 2   # the training's rest; (a)'s training and (c)'s
#                                              # damage table (qlip_controls.sh PHASE=early); the
#                                              # evals of fixed A5, A4 and QLIP {4,5,6}
#   bash benchmarks/qlip_rebuild.sh "$OUT" 3   # the controls (a), (b), (c) evaluated and compared
#                                              # with QLIP (qlip_controls.sh)
# with BANK=4,5,6,8 SETS=4,5,6 FIXED="5 4" and N (default 2000) held-out prompts into RUN
# (default runs/qfr). Every step resumes where a limit cut it, so a call may be repeated. Each
# call ends with benchmarks/collect_records.sh RUN "$OUT" (every record, the steps' logs among
# them under RUN/logs/rebuild_*.txt; calls 1 and 2 also the model and eval folders a later call
# needs: the FP eval, the bank model, QLIP, the timestep-only Q2B, QLIP's eval with its bits):
# unpack what comes back from the repository root (records.tgz, state_<folder>.tgz; split parts
# with `cat NAME.tgz.part-* | tar xzf -`), and if the machine went back between calls, carry
# ["RUN", ".whl"] in the next (64 MiB at most).
# Issue each call within the device's 30 s idle window. GPU calibration and Q2B training are not
# deterministic: the rows measured on the rebuilt model are compared only with each other
# (docs/results/qlip.md, "What is left").
# The limits: T_QUANTIZE, T_TRAIN1 (call 1; by default what T_CALL, 560 s, leaves), T_TRAIN2,
# T_EARLY, T_EVAL (call 2), T_CONTROLS (call 3), seconds. On an H100 (twenty-second session,
# docs/results/qlip/h100_rebuild) the calibration took 382 s with the FP eval (66 s) and FP
# stages (72 s) beside it, and Q2B ran 100 of its 500 iterations in the 100 s left; the H200's
# first result took about 230 s an eval.
# Smoke test (CPU): the smoke settings of qlip_first_result.sh's header in the environment,
#   N=16 DEVICE=cpu RUN=/tmp/qfr bash benchmarks/qlip_rebuild.sh /tmp/qfr_out 1
set -uo pipefail
out=${1:?output folder}; call=${2:?call 1, 2 or 3}
run=${RUN:-runs/qfr}; n=${N:-2000}; device=${DEVICE:-cuda}
here=$(dirname "$0")
# shellcheck source=benchmarks/device_call.sh
source "$here/device_call.sh"  # the wheels, machine.txt, limited NAME LIMIT COMMAND...
# (SETS holds one set, {4,5,6}: it trains in qlip_work, PHASE=train, where the controls find it)
export BANK=4,5,6,8 SETS=4,5,6 FIXED="5 4" SET=4,5,6 WORK=qlip_work
# A call on a fresh machine meets the caches another machine fingerprinted (brought back in
# records.tgz: the T2Q, the Q2B checkpoint): one whose inputs differ in their last bits on this
# GPU is computed again rather than refused (--redo-stale), and one that matches is reused
export TRAIN_EXTRA="${TRAIN_EXTRA:-} --redo-stale"
mkdir -p "$run/logs"
timed() {  # timed NAME LIMIT COMMAND...: limited, its log in RUN/logs (collected in records.tgz:
    # a call returns at most 8 files)
    limited "$@" > "$run/logs/rebuild_$1.txt" 2>&1
}
# the model folders each call brings back beside records.tgz (at most 8 files a call): what a
# later call on a new machine needs carried, and what the local analysis reads
case "$call" in
    1) only="eval_fp q_qd_w4 q_qlip_4-5-6" ;;
    2) only="q_qlip_4-5-6 q_timestep_4-5-6 eval_qlip_4-5-6" ;;
    *) only="" ;;
esac
case "$call" in
    1)
        PHASE=quantize timed quantize "${T_QUANTIZE:-420}" \
            bash "$here/qlip_first_result.sh" "$run" "$n" "$device"
        # the training takes what the call has left (T_CALL, default 560 s, less 30 s for the
        # records): a call that found the model already made trains for most of it
        left=$(( ${T_CALL:-560} - SECONDS - 30 ))
        PHASE=train timed train "${T_TRAIN1:-$(( left > 60 ? left : 60 ))}" \
            bash "$here/qlip_first_result.sh" "$run" "$n" "$device" ;;
    2)
        PHASE=train timed train "${T_TRAIN2:-150}" \
            bash "$here/qlip_first_result.sh" "$run" "$n" "$device"
        PHASE=early timed controls_early "${T_EARLY:-120}" \
            bash "$here/qlip_controls.sh" "$run" "$n" "$device"
        PHASE=eval JOBS=${JOBS:-3} timed eval "${T_EVAL:-270}" \
            bash "$here/qlip_first_result.sh" "$run" "$n" "$device" ;;
    3)
        JOBS=${JOBS:-3} timed controls "${T_CONTROLS:-540}" \
            bash "$here/qlip_controls.sh" "$run" "$n" "$device" ;;
    *) echo "call must be 1, 2 or 3" >&2; exit 2 ;;
esac
if [ -n "$only" ]; then
    MODELS=1 ONLY="$only" bash "$here/collect_records.sh" "$run" "$out" > /dev/null
else
    bash "$here/collect_records.sh" "$run" "$out" > /dev/null
fi
find "$out" -type f | sort
