# Sourced by the benchmark scripts: timed LABEL COMMAND... runs COMMAND and appends
# "LABEL: S s (exit code)" to $out/timings.txt. The QLIP scripts also use evaluate, throttle and fp_stages_copy
# (they read the script's $out, $qlip, $common and $jobs).
timed() {
    local label=$1 start=$SECONDS code; shift
    "$@"; code=$?
    echo "$label: $((SECONDS - start)) s (exit $code)" | tee -a "$out/timings.txt"
    return $code
}

evaluate() {  # evaluate NAME LABEL [qlip eval options...]: `qlip eval` against $out/eval_fp,
    # skipped when its metrics.json exists
    local name=$1 label=$2; shift 2
    local lock="$out/eval_$name/.qlip.lock"
    # another script's job evaluating the same run (two controls' runs share the timestep-only
    # control): wait for it instead of failing on its folder's lock, then reuse its result
    while [ -e "$lock" ] && command -v flock > /dev/null && ! flock -n "$lock" true; do sleep 2; done
    [ -e "$out/eval_$name/metrics.json" ] && return 0
    timed "eval $name" $qlip eval "${common[@]}" --label "$label" --reference-run "$out/eval_fp" \
        --out "$out/eval_$name" "$@" > "$out/logs/eval_$name.txt" 2>&1
}
fp_stages_copy() {  # fp_stages_copy WORK DIR: DIR (once) holds a copy of train-qlip's work folder
    # WORK without its Q2B stages, so another Q2B trains beside WORK's (a work folder is locked by
    # one job); its caches are fingerprinted by content, so the copies are reused, not recomputed
    local stage
    [ -d "$2" ] && return 0
    mkdir -p "$2" && for stage in "$1"/*/; do
        case "$(basename "$stage")" in q2b_*) ;; *) cp -a "$stage" "$2/" ;; esac
    done
}

throttle() { while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done; }
