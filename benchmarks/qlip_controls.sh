#!/usr/bin/env bash
# Issue 12's controls on the reference world, next to QLIP A{4,5,6} of a finished
# benchmarks/qlip_first_result.sh run folder OUT (it needs OUT/q_qd_w4, the bank model;
# OUT/q_qlip_4-5-6, QLIP; OUT/eval_qlip_4-5-6 with bits.safetensors, QLIP's eval; OUT/eval_fp,
# the FP eval; OUT/qlip_work_4-5-6, QLIP's work folder, whose Q2B trajectories are reused):
#   bash benchmarks/qlip_controls.sh OUT [N=1000] [DEVICE=cuda]
#   PHASE=early bash benchmarks/qlip_controls.sh OUT [N] [DEVICE]
# PHASE=early does what needs no QLIP eval: (a)'s training and (c)'s damage table (cached in the
# work folder). Run it after the first result's PHASE=train, beside its PHASE=eval; the plain run
# then reuses both, and (c)'s search at QLIP's FAB takes seconds.
# Same prompts, seeds, steps and batch as the first result's evals (N must be its N), each
# --reference-run OUT/eval_fp, each prompt at its own bits (--batch-mode per_image):
#   timestep_4-5-6: `qlip train-qlip --ignore-prompt` (Q2B's q a constant: bits per layer and step
#                   only; the same training settings as QLIP's; LAM_A, if set, replaces λ)
#                   -> OUT/q_timestep_4-5-6, evaluated like QLIP;
#   random_4-5-6:   `--policy random-matched --bits-from OUT/eval_qlip_4-5-6` (QLIP's requested
#                   bits' proportions per step and layer, drawn per prompt, seed POLICY_SEED);
#   per_layer_4-5-6: `qlip per-layer --target-fab <QLIP's FAB> --bits 4,5,6` on QLIP's Q2B rows
#                   (OUT/per_layer_4-5-6.json), evaluated with `--policy per-layer`.
# Then `qlip compare` of QLIP against each, the three at once (OUT/compare_qlip_<set>_vs_<name>.{md,json},
# written when whole; A = QLIP), the
# decision rule's overall verdict per control (QLIP better / not worse / worse) and
# OUT/controls.md: every run's FAB against QLIP's, a line for each off by more than 0.1 bit
# (the timestep-only FAB is whatever its λ gives: rerun with another LAM_A, after deleting
# OUT/q_timestep_4-5-6 and OUT/eval_timestep_4-5-6). Every step is skipped when its result exists,
# so a call cut by a timeout resumes. Steps run in turn; the three evals JOBS at a time.
# QLIP=NAME puts another QLIP row of OUT in QLIP's place (e.g. QLIP=abl_label_sensitivity, an
# ablation row of benchmarks/qlip_ablations.sh: OUT/q_NAME, OUT/eval_NAME): (b) and (c) are then
# matched to that row (random_NAME, per_layer_NAME), (a) is shared (it does not depend on QLIP),
# and the comparisons and the summary are compare_NAME_vs_<control>.{md,json} and
# controls_NAME.md.
# Smoke test (CPU; first the first result's own smoke test into OUT, then, with its settings):
#   STEPS=2 N_T2Q=40 TRAIN_EXTRA="--q2b-prompts 4 --q2b-iters 4 --t2q-iters 50 --chunk 16"
#   EVAL_EXTRA="--bootstrap-resamples 20" COMPARE_RESAMPLES=20 PER_LAYER_EXTRA="--max-rows 16"
#   bash benchmarks/qlip_controls.sh OUT 16 cpu
# (ran on the 2-core CPU, 2026-12-02, on a PTQD smoke folder of qlip_first_result.sh with
# SET=8,16,32 WORK=qlip_work BASE=q_ptqd_w4 MNAME=PTQD: every step and compare finished;
# per-layer 203 s, three evals 67 s each at once; again 2026-12-03 on the Q-Diffusion smoke
# folder, with the verdict table: every step finished)
set -uo pipefail
out=${1:?output folder of qlip_first_result.sh}; n=${2:-1000}; device=${3:-cuda}
jobs=${JOBS:-3}; steps=${STEPS:-25}; n_t2q=${N_T2Q:-10000}
# another option set, method or work folder of the first result's layout (defaults: {4,5,6} on
# Q-Diffusion): SET=8,16,32 WORK=qlip_work, or BASE=q_ptqd_w4 MNAME=PTQD for a PTQD run folder
set_bits=${SET:-4,5,6}; t=${set_bits//,/-}; base=${BASE:-q_qd_w4}; work=${WORK:-qlip_work_$t}
mname=${MNAME:-Q-Diffusion}
# the QLIP row the controls stand beside, and the names of the two controls matched to it
qname=${QLIP:-qlip_$t}
if [ "$qname" = "qlip_$t" ]; then random="random_$t"; layered="per_layer_$t"; summary_name=controls
else random="random_$qname"; layered="per_layer_$qname"; summary_name="controls_$qname"; fi
# shellcheck source=benchmarks/qlip_folder.sh
source "$(dirname "$0")/qlip_folder.sh"
fab_of() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['$2'])" "$1"; }
# the rows Q2B trained on: train-qlip's --q2b-prompts (128 unless TRAIN_EXTRA changes it)
q2b_prompts=$(echo "${TRAIN_EXTRA:-}" | sed -n 's/.*--q2b-prompts \([0-9]*\).*/\1/p')
q2b_prompts=${q2b_prompts:-128}
chunk=$(echo "${TRAIN_EXTRA:-}" | sed -n 's/.*--chunk \([0-9]*\).*/\1/p')
# shellcheck disable=SC2206
per_layer=(--model reference --device "$device" --quantized "$out/$base" --bits "$set_bits"
           --work-dir "$out/$work" --num-prompts "$q2b_prompts" --steps "$steps" --guidance 4
           --chunk "${chunk:-1000}" --batch-size 250 --no-progress ${PER_LAYER_EXTRA:-})

# (a) the timestep-only Q2B, trained on QLIP's trajectories, in its own copy of QLIP's FP stages
# (cached by content, not resampled; a work folder is locked by one job, and (c) reads WORK)
timestep() {
    [ -e "$out/q_timestep_$t/qlip.json" ] && return 0
    local dir="$out/qlip_work_timestep_$t"
    fp_stages_copy "$out/$work" "$dir"
    timed "train-qlip timestep $t" $qlip train-qlip "${train[@]}" --work-dir "$dir" \
        --quantized "$out/$base" --bits "$set_bits" --ignore-prompt ${LAM_A:+--lam "$LAM_A"} \
        --out "$out/q_timestep_$t" > "$out/logs/train_timestep_$t.txt" 2>&1
}

if [ "${PHASE:-all}" = early ]; then
    # what needs no QLIP eval, beside the first result's evals: (a)'s training and (c)'s damage
    # table (cached in WORK: the assignment at QLIP's FAB then takes seconds)
    require "PHASE=quantize, train" "$base/quant_state.safetensors" "$work"
    timestep &
    timed "per-layer damage $t" $qlip per-layer "${per_layer[@]}" --damage-only \
        > "$out/logs/per_layer_damage_$t.txt" 2>&1
    wait
    exit 0
fi

require "PHASE=quantize, train_b, eval" "$base/quant_state.safetensors" "q_$qname/qlip.json" \
    "eval_$qname/bits.safetensors" eval_fp/metrics.json "eval_$qname/metrics.json"
target=$(fab_of "$out/eval_$qname/metrics.json" fab_requested)
echo "$qname A{$set_bits}: FAB requested $target"
timestep
# (c) the per-layer assignment at QLIP's FAB, on the same rows (the damage table from PHASE=early
# when it ran)
[ -e "$out/$layered.json" ] || \
    timed "$layered" $qlip per-layer "${per_layer[@]}" --target-fab "$target" \
        --out "$out/$layered.json" > "$out/logs/$layered.txt" 2>&1

[ -e "$out/q_timestep_$t/qlip.json" ] && { throttle; evaluate "timestep_$t" \
    "$mname W4 + timestep-only Q2B A{$set_bits}" --quantized "$out/q_timestep_$t" & }
throttle; evaluate "$random" "$mname W4 + random matched to $qname A{$set_bits}" \
    --quantized "$out/$base" --policy random-matched --bits-from "$out/eval_$qname" \
    --policy-seed "${POLICY_SEED:-0}" &
[ -e "$out/$layered.json" ] && { throttle; evaluate "$layered" \
    "$mname W4 + per-layer A{$set_bits} at FAB $target" --quantized "$out/$base" \
    --policy per-layer --assignment "$out/$layered.json" & }
wait

summary="$out/$summary_name.md"
controls=("timestep_$t" "$random" "$layered")
{ echo "# Issue 12's controls against $qname A{$set_bits} ($n held-out prompts)"; echo
  echo "| run | FAB requested | FAB | BitOPs (T) |"; echo "|---|---:|---:|---:|"
  for name in "$qname" "${controls[@]}"; do
      m="$out/eval_$name/metrics.json"
      [ -e "$m" ] || { echo "| $name | (not evaluated: see $out/logs) | | |"; continue; }
      echo "| $name | $(fab_of "$m" fab_requested) | $(fab_of "$m" fab) | $(fab_of "$m" bitops_t) |"
  done; echo; } > "$summary"
compare_one() {  # QLIP against control $1; the two files appear only once the comparison is whole
    # (a call cut mid-way leaves no empty .md behind that a resumed run would take for done)
    local name=$1 md="$out/compare_${qname}_vs_$1.md" json="$out/compare_${qname}_vs_$1.json"
    [ -s "$md" ] && [ -s "$json" ] && return 0
    $qlip compare "$out/eval_$qname" "$out/eval_$name" --device "$device" \
        --resamples "${COMPARE_RESAMPLES:-2000}" --json "$json.part" > "$md.part" \
        2> "$out/logs/compare_$name.txt" && mv "$json.part" "$json" && mv "$md.part" "$md"
    rm -f "$json.part" "$md.part"
}
for name in "${controls[@]}"; do
    [ -e "$out/eval_$name/metrics.json" ] || continue
    fab=$(fab_of "$out/eval_$name/metrics.json" fab_requested)
    python3 -c "import sys; sys.exit(abs($fab - $target) > 0.1)" || \
        echo "- $name: FAB $fab is more than 0.1 bit from $qname's $target" >> "$summary"
    compare_one "$name" &  # the three comparisons at once
done
wait
# the issue's question, by the decision rule (docs/metrics.md): is QLIP better than each control?
{ echo; echo "| $qname against | by the decision rule | $qname better on | $qname worse on |"
  echo "|---|---|---|---|"; } >> "$summary"
for name in "${controls[@]}"; do
    [ -e "$out/compare_${qname}_vs_${name}.json" ] || continue
    python3 -c "import json, sys; d = json.load(open(sys.argv[1]))['decision']
print(f\"| {sys.argv[2]} | {sys.argv[3]} {d['overall']} | {', '.join(d['a_better_on']) or '–'} | \"
      f\"{', '.join(d['a_worse_on']) or '–'} |\")" "$out/compare_${qname}_vs_${name}.json" "$name" "$qname" \
        >> "$summary"
done
for name in "${controls[@]}"; do
    [ -e "$out/compare_${qname}_vs_${name}.md" ] || continue
    { echo; echo "## $qname vs $name"; echo; cat "$out/compare_${qname}_vs_${name}.md"; } >> "$summary"
done
cat "$summary"
grep -h "exit [1-9]" "$out/timings.txt" 2>/dev/null && echo "some steps failed: see $out/logs" >&2
exit 0
