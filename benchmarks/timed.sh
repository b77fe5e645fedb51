# Sourced by the benchmark scripts: timed LABEL COMMAND... runs COMMAND and appends
# "LABEL: S s (exit code)" to $out/timings.txt. The QLIP scripts also use evaluate and throttle
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
    [ -e "$out/eval_$name/metrics.json" ] && return 0
    timed "eval $name" $qlip eval "${common[@]}" --label "$label" --reference-run "$out/eval_fp" \
        --out "$out/eval_$name" "$@" > "$out/logs/eval_$name.txt" 2>&1
}
throttle() { while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done; }
