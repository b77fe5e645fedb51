# Sourced by the scripts that work on a finished benchmarks/qlip_first_result.sh folder
# (qlip_controls.sh, qlip_ablations.sh): the settings their runs share with the first result's
# evals (prompts, seeds, steps, batch; each prompt at its own bits) and its training, from the
# sourcing script's $out, $n, $device, $steps, $n_t2q, $jobs, EVAL_EXTRA and TRAIN_EXTRA.
qlip="python3 -m qlip.cli"
# shellcheck disable=SC2206
common=(--model reference --device "$device" --prompts heldout --num-images "$n" --batch-size 250
        --steps "$steps" --guidance 4 --batch-mode per_image ${EVAL_EXTRA:-})
# shellcheck disable=SC2206
train=(--model reference --device "$device" --num-prompts "$n_t2q"
       --steps "$steps" --guidance 4 --batch-size 250 --chunk 1000 --no-progress ${TRAIN_EXTRA:-})
mkdir -p "$out/logs"
cores=$(nproc)
export OMP_NUM_THREADS=$(( cores / jobs > 0 ? cores / jobs : 1 ))  # no oversubscription
# shellcheck source=benchmarks/timed.sh
source "$(dirname "${BASH_SOURCE[0]}")/timed.sh"

require() {  # require WHAT PATH...: exit unless every OUT/PATH exists
    local what=$1 need; shift
    for need in "$@"; do
        [ -e "$out/$need" ] || { echo "$out/$need is missing: run benchmarks/qlip_first_result.sh" \
                                      "($what) into $out first" >&2; exit 1; }
    done
}
