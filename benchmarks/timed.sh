# Sourced by the benchmark scripts: timed LABEL COMMAND... runs COMMAND and appends
# "LABEL: S s (exit code)" to $out/timings.txt.
timed() {
    local label=$1 start=$SECONDS code; shift
    "$@"; code=$?
    echo "$label: $((SECONDS - start)) s (exit $code)" | tee -a "$out/timings.txt"
    return $code
}
