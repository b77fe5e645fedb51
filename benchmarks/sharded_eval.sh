#!/usr/bin/env bash
# Issue 16: `qlip eval` on the reference world in one process against NPROC processes (torchrun),
# FP and Q-Diffusion W4A8: wall time per 1,000 images, the scaling factor, whether every image
# of the sharded run equals the single-process one (a hash of each image's pixels), and the
# metrics with their intervals (OUT/sharded_eval.json).
#   bash benchmarks/sharded_eval.sh OUT [N=10000] [DEVICE=cuda] [NPROC=2]
# On GPUs each rank takes cuda:LOCAL_RANK. On the CPU every process runs one thread (a CPU
# matmul's float sums depend on how many threads split them, so one thread is what makes the
# two runs' images comparable), and the W4A8 model uses Q-Diffusion's weight grid without
# AdaRound (QUANT_EXTRA="--recon-iters 0", the default on the CPU) to keep the calibration short.
# The held-out prompts are cycled with new seeds past their count (`--num-images`).
set -uo pipefail
out=${1:?output folder}; n=${2:-10000}; device=${3:-cuda}; nproc=${4:-2}
steps=${STEPS:-25}
qlip="python3 -m qlip.cli"
if [ "$device" = cpu ]; then
    export OMP_NUM_THREADS=1
    quant_extra=${QUANT_EXTRA:---recon-iters 0}
else
    quant_extra=${QUANT_EXTRA:-}
fi
mkdir -p "$out/logs"
# shellcheck disable=SC2206
common=(--model reference --device "$device" --prompts heldout --num-images "$n"
        --batch-size "${BATCH:-250}" --steps "$steps" --guidance 4 ${EVAL_EXTRA:-})
# shellcheck source=benchmarks/timed.sh
source "$(dirname "$0")/timed.sh"

if [ ! -e "$out/q_qd_w4a8/quant_state.safetensors" ]; then
    # shellcheck disable=SC2086
    timed "quantize qd_w4a8" $qlip quantize --model reference --device "$device" --guidance 4 \
        --method qdiffusion --wbits 4 --abits 8 --seed 0 $quant_extra --out "$out/q_qd_w4a8" \
        > "$out/logs/quantize.txt" 2>&1 || exit 1
fi
for run in fp qd_w4a8; do
    extra=()
    [ "$run" = qd_w4a8 ] && extra=(--quantized "$out/q_qd_w4a8")
    [ -e "$out/${run}_single/metrics.json" ] || \
        timed "eval ${run} single" $qlip eval "${common[@]}" "${extra[@]}" \
            --out "$out/${run}_single" > "$out/logs/${run}_single.txt" 2>&1
    [ -e "$out/${run}_sharded/metrics.json" ] || \
        timed "eval ${run} sharded x$nproc" python3 -m torch.distributed.run --standalone \
            --nproc-per-node "$nproc" -m qlip.cli eval "${common[@]}" "${extra[@]}" \
            --out "$out/${run}_sharded" > "$out/logs/${run}_sharded.txt" 2>&1
done
python3 - "$out" "$n" "$nproc" "$device" <<'EOF'
import hashlib, json, re, sys
from pathlib import Path

import numpy as np
from PIL import Image

out, n, nproc, device = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
seconds = {}
for line in (out / "timings.txt").read_text().splitlines():
    match = re.match(r"eval (\S+) (single|sharded x\d+): (\d+) s \(exit 0\)", line)
    if match:
        seconds[(match[1], match[2].split()[0])] = int(match[3])


def hashes(folder: Path) -> list[str]:
    return [hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest()
            for p in sorted((folder / "images").glob("*.png"))]


result = {"device": device, "images": n, "processes": nproc, "runs": {}}
for run in ("fp", "qd_w4a8"):
    single, sharded = out / f"{run}_single", out / f"{run}_sharded"
    if not ((single / "metrics.json").is_file() and (sharded / "metrics.json").is_file()):
        continue
    a, b = hashes(single), hashes(sharded)
    metrics = {k: json.loads((f / "metrics.json").read_text()) for k, f in
               (("single", single), ("sharded", sharded))}
    t1, t2 = seconds.get((run, "single")), seconds.get((run, "sharded"))
    result["runs"][run] = {
        "seconds_single": t1, "seconds_sharded": t2,
        "seconds_per_1000_single": t1 and 1000 * t1 / n,
        "seconds_per_1000_sharded": t2 and 1000 * t2 / n,
        "scaling": t1 / t2 if t1 and t2 else None,
        "images_equal": len(a) == len(b) == n and a == b, "images": [len(a), len(b)],
        "metrics_equal": {k: metrics["single"].get(k) == metrics["sharded"].get(k)
                          for k in ("fid", "sfid", "clip_score", "alignment", "fab")},
        "metrics": {k: metrics["single"].get(k) for k in
                    ("fid", "sfid", "clip_score", "alignment", "fab")},
        "intervals": {k: metrics["single"].get("intervals", {}).get(k) for k in
                      ("fid", "sfid", "clip_score", "alignment")},
    }
(out / "sharded_eval.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
EOF
