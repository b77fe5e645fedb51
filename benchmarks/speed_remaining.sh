#!/usr/bin/env bash
# Issue 14's measurements still missing after the twenty-first session, as device calls of at
# most ~9.5 minutes each (from the repository root on the GPU machine, .whl carried), in order:
#   bash benchmarks/speed_remaining.sh "$OUT" a
#     the persistent kernels' tests on CUDA; the SDXL real step at batch 8 with the packed fp8
#     model beside bf16 channels-last, the two alone (the twenty-first session's call 1 ran three
#     real variants beside bf16 and none finished compiling within 440 s)
#   ... b   the fused attention's tests on CUDA; SD 1.4's attention shapes at batch 8 alone
#           (benchmarks/attention_speed.py: SDPA, the fused kernel now and as it was at the
#           start of the twenty-first session); the first target (simulated W4A8 with attention,
#           the fused kernel compiled, channels-last) at batch 8
#   ... c   the SD 1.4 real step at batch 2 and 1 (bf16, int8, fp8)
#   ... d   the SDXL real step at batch 1 (bf16, int8, packed fp8; two real variants at most
#           beside bf16 finish compiling within the limit)
#   ... e   SDXL's Linear and 3×3 conv shapes alone (benchmarks/real_tile_sweep.py --arch
#           sdxl): the persistent kernels' tiles against cuBLAS's and cuDNN's bf16 there
#   ... f   the weight memory on CUDA (the packed fp8 model's allocation); the first target at
#           batch 2
# A fresh machine pays Triton's and Inductor's compiles (about 2 minutes a real SD 1.4 variant,
# 4 for SDXL); the limits below leave each step's timing turns after them.
# Each part's records come back as at most 8 files: machine.txt (every step's exit code and
# seconds), the tests' and steps' logs, and records.tgz (the JSON records, parts and suites).
set -uo pipefail
out=${1:?output folder}; part=${2:?a, b, c, d, e or f}
here=$(dirname "$0")
# shellcheck source=benchmarks/device_call.sh
source "$here/device_call.sh"  # the wheels, machine.txt, limited NAME LIMIT COMMAND...
case "$part" in
    a)
        limited tests 120 python3 -m pytest -q -p no:cacheprovider tests/engine/test_real_conv.py \
            tests/engine/test_real_gemm.py -k "persistent or boxes" > "$out/tests.txt" 2>&1
        ARCH=sdxl BATCH=8 T_REAL=${T_REAL:-420} \
            REAL_VARIANTS=bf16_channels_last,w4a8_layers_real_fp8_fast_packed \
            limited sdxl_b8 430 bash "$here/speed_suite.sh" "$out/sdxl_b8" real > /dev/null 2>&1 ;;
    b)
        limited tests 120 python3 -m pytest -q -p no:cacheprovider \
            tests/engine/test_fused_attention.py > "$out/tests.txt" 2>&1
        mkdir -p "$out/attention"
        limited attention 150 python3 "$here/attention_speed.py" --arch sd14 --batch 8 \
            --ways sdpa,fused,before \
            --before docs/results/speed/twenty_first_session/fused_attention_before.py \
            --out "$out/attention/attention_speed.json" > "$out/attention_speed.txt" 2>&1
        BATCH=8 T_STEP=${T_STEP:-250} SIM_CHANNELS_LAST=1 \
            VARIANTS=bf16_channels_last,w4a8_layers,w4a8_attention_fused \
            limited first_target_b8 260 bash "$here/speed_suite.sh" "$out/first_b8" step \
            > /dev/null 2>&1 ;;
    c)
        for b in 2 1; do
            BATCH=$b T_REAL=${T_REAL:-250} \
                REAL_VARIANTS=bf16_channels_last,w4a8_layers_real,w4a8_layers_real_fp8_fast \
                limited "sd14_real_b$b" 260 bash "$here/speed_suite.sh" "$out/real_b$b" real \
                > /dev/null 2>&1
        done ;;
    d)
        ARCH=sdxl BATCH=1 T_REAL=${T_REAL:-500} \
            REAL_VARIANTS=bf16_channels_last,w4a8_layers_real,w4a8_layers_real_fp8_fast_packed \
            limited sdxl_b1 510 bash "$here/speed_suite.sh" "$out/sdxl_b1" real > /dev/null 2>&1 ;;
    e)
        limited sweep 540 python3 "$here/real_tile_sweep.py" --arch sdxl --kinds linear,conv \
            --tiles "128,128,128,8,4 128,256,128,8,3 128,256,64,8,3 128,128,64,8,4 64,128,64,4,3" \
            --out "$out/sdxl_tile_sweep.json" > "$out/sdxl_tile_sweep.txt" 2>&1 ;;
    f)
        limited memory 90 python3 "$here/weight_memory.py" --device cuda \
            --out "$out/weight_memory.json" > "$out/weight_memory.txt" 2>&1
        BATCH=2 T_STEP=${T_STEP:-250} SIM_CHANNELS_LAST=1 \
            VARIANTS=bf16_channels_last,w4a8_layers,w4a8_attention,w4a8_attention_fused \
            limited first_target_b2 260 bash "$here/speed_suite.sh" "$out/first_b2" step \
            > /dev/null 2>&1 ;;
    *) echo "part must be a, b, c, d, e or f" >&2; exit 2 ;;
esac
# at most 8 files come back: the step logs stay, the JSON records, parts and suites travel as
# one tarball
cd "$out" && records=$(find . -mindepth 2 \( -name '*.json' -o -name 'parts.tgz' \
                                           -o -name 'suite.txt' \)) \
    && { [ -z "$records" ] || { tar czf records.tgz $records && rm $records; }; }
find . -type f | sort
