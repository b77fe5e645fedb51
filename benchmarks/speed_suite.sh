#!/usr/bin/env bash
# Issue 14's measurements on one GPU, in one call, nothing else on the device:
#   bash benchmarks/speed_suite.sh OUT [STEPS="tests compile step real mixed memory profile layers"]
# tests   the Triton kernels' tests on CUDA (first tile, conftest's QLIP_AUTOTUNE=0; the tuned
#         launch in test_kernel_autotune.py)                   -> OUT/kernel_tests.txt
# step    benchmarks/sd14_unet_step.py at BATCH (default 8), ARCH (sd14), VARIANTS (bf16 in both
#         layouts, simulated W4A8 ± attention, the fused attention), compiled unless COMPILE=0;
#         SIM_CHANNELS_LAST=1 runs the simulated variants channels-last, as the best bf16
#                                                              -> OUT/unet_step.<arch>.b<batch>.json
# real    the same for REAL_VARIANTS (bf16 in both layouts again, for ratios within the run; real
#         int8 and packed, eager and compiled)         -> OUT/unet_step.<arch>.b<batch>.real.json
#         Apart from the step: on an H100 at batch 8 the real variants' first eager call took
#         423 and 442 s (twelfth session), most likely Triton compiling the conv kernel's tiles, its 3×3
#         taps unrolled (8-49 s a tile on a 2-core CPU). The taps are now one loop (about 2 s a tile). Each
#         variant waits at most half the step's limit for the others to compile (--barrier-s),
#         and a turn whose variant is still compiling is skipped.
#         (each variant's finished phases also in OUT/unet_step.<arch>.b<batch>.parts/, packed
#         into OUT/parts.tgz when the suite ends: a step
#         cut by its limit keeps its eager and CUDA-graph times there, marked "partial"; the
#         limit's SIGTERM stops every variant process, so nothing of it runs into the next step)
# compile benchmarks/real_compile_check.py: Inductor on the tiny UNet with every layer real (how
#         long the compile takes on this GPU; the compiled outputs against the eager real model)
#                                                              -> OUT/real_compile.json
# mixed   benchmarks/mixed_latency.py (MIXED_ARGS, e.g. "--batch 8 --compile"): latency against FAB
#         under mixed real execution                           -> OUT/mixed_latency.{json,png}
# memory  benchmarks/weight_memory.py --device cuda            -> OUT/weight_memory.json
# profile benchmarks/step_profile.py: each PROFILE_VARIANTS' compiled step's GPU time by kind of
#         kernel (GEMM, conv, attention, layout, quantizers, real kernels, Inductor's, the rest)
#                                                              -> OUT/step_profile.json
# layers  benchmarks/real_layer_speed.py: every real layer shape of the UNet at BATCH timed alone,
#         real (codes rounded once, conv codes tap-major, no row sums), real with the codes rounded
#         in the tiles, the conv in the weight's order, with the row sums (the full zero-point
#         bracket), bf16 and simulated                             -> OUT/real_layer_speed.json
#         (LAYER_WAYS: its --extra-ways, default all; none times real, bf16 and simulated only)
# Each step writes straight into OUT with its own time limit (T_TESTS, T_STEP, T_REAL, T_COMPILE,
# T_MIXED, T_MEMORY, T_PROFILE seconds), so a step cut by its limit leaves what it printed and the steps after it
# still run. OUT/suite.txt lists each step's exit code and seconds.
set -uo pipefail
out=${1:?output folder}; steps=${2:-tests compile step real mixed memory profile layers}
batch=${BATCH:-8}; arch=${ARCH:-sd14}
variants=${VARIANTS:-bf16,bf16_channels_last,w4a8_layers,w4a8_attention,w4a8_attention_fused}
real_variants=${REAL_VARIANTS:-bf16,bf16_channels_last,w4a8_layers_real,w4a8_layers_real_packed}
here=$(dirname "$0")
mkdir -p "$out"
unet_step() {  # unet_step NAME LIMIT VARIANTS SUFFIX
    step "$1" "$2" "$out/unet_step.$arch.b$batch$4.txt" \
        python3 "$here/sd14_unet_step.py" --arch "$arch" --batch "$batch" --eager-rounds 2 \
        --rounds 2 --variants "$3" --barrier-s $(($2 / 2)) $([ "${COMPILE:-1}" = 0 ] && echo --no-compile) \
        $([ "${SIM_CHANNELS_LAST:-0}" = 1 ] && echo --sim-channels-last) \
        --out "$out/unet_step.$arch.b$batch$4.json"
}
step() {  # step NAME LIMIT LOG COMMAND...
    local name=$1 limit=$2 log=$3 start=$SECONDS code; shift 3
    timeout "$limit" "$@" > "$log" 2>&1; code=$?
    echo "$name: exit $code in $((SECONDS - start)) s" | tee -a "$out/suite.txt"
}
for s in $steps; do
    case "$s" in
        tests) step tests "${T_TESTS:-150}" "$out/kernel_tests.txt" python3 -m pytest -v \
                   -p no:cacheprovider "$here/../tests/engine/test_real_gemm.py" \
                   "$here/../tests/engine/test_real_conv.py" "$here/../tests/engine/test_kernel_autotune.py" \
                   "$here/../tests/engine/test_fused_attention.py" "$here/../tests/engine/test_fused_quantize.py" ;;
        step) unet_step step "${T_STEP:-330}" "$variants" "" ;;
        real) unet_step real "${T_REAL:-420}" "$real_variants" .real ;;
        compile) step compile "${T_COMPILE:-240}" "$out/real_compile.txt" \
                     python3 "$here/real_compile_check.py" --out "$out/real_compile.json" ;;
        mixed) step mixed "${T_MIXED:-120}" "$out/mixed_latency.txt" \
                   python3 "$here/mixed_latency.py" ${MIXED_ARGS:-} --out "$out/mixed_latency.json" ;;
        memory) step memory "${T_MEMORY:-120}" "$out/weight_memory.txt" \
                    python3 "$here/weight_memory.py" --device cuda --out "$out/weight_memory.json" ;;
        profile) step profile "${T_PROFILE:-300}" "$out/step_profile.txt" \
                     python3 "$here/step_profile.py" --arch "$arch" --batch "$batch" --variants \
                     "${PROFILE_VARIANTS:-bf16_channels_last,w4a8_layers,w4a8_layers_real}" \
                     --out "$out/step_profile.json" ;;
        layers) step layers "${T_LAYERS:-240}" "$out/real_layer_speed.txt" \
                    python3 "$here/real_layer_speed.py" --arch "$arch" --batch "$batch" \
                    --extra-ways "${LAYER_WAYS:-all}" --out "$out/real_layer_speed.json" ;;
        *) echo "unknown step $s (tests step real compile mixed memory profile layers)" >&2; exit 2 ;;
    esac
done
# A device call brings back at most 8 files: the steps' per-variant records (*.parts/, what a
# step cut by its limit leaves) travel as one tarball (the seventeenth session lost a cut
# step's records to that limit)
parts=$(cd "$out" && ls -d ./*.parts 2>/dev/null)
if [ -n "$parts" ]; then
    # shellcheck disable=SC2086
    (cd "$out" && tar czf parts.tgz $parts && rm -r $parts)
fi
cat "$out/suite.txt"
