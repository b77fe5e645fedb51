#!/usr/bin/env bash
# Issue 14's measurements still missing after the twenty-second session, as device calls of at
# most ~9.5 minutes each (from the repository root on the GPU machine, .whl carried), in order:
#   bash benchmarks/speed_remaining.sh "$OUT" b
#     the first target alone: simulated W4A8 with attention (the fused kernel, compiled,
#     channels-last) beside bf16 channels-last at batch 8, the two alone with most of the call;
#     then SD 1.4's largest attention shape alone (benchmarks/attention_speed.py --largest 1:
#     SDPA, the fused kernel now and at 1080686, whose loops 528aa8f restructured: 1.119 ms then,
#     1.218 now, timed on two machines)
#   ... a   the SDXL real step at batch 8, the packed fp8 model beside bf16 channels-last, the two
#           alone with most of the call (the second target's speed half)
#   ... c   the SD 1.4 real step at batch 2 and 1 (bf16, int8, fp8)
#   ... d   the SDXL real step at batch 1 (bf16, int8, packed fp8; two real variants at most
#           beside bf16 finish compiling within the limit)
#   ... e   SDXL's Linear and 3×3 conv shapes alone (benchmarks/real_tile_sweep.py --arch
#           sdxl): the persistent kernels' tiles against cuBLAS's and cuDNN's bf16 there
#   ... f   the weight memory on CUDA (the packed fp8 model's allocation); the first target at
#           batch 2
#   ... t   the CUDA tests of the fused attention and the persistent kernels (both passed in the
#           twenty-second session)
# A fresh machine pays Triton's and Inductor's compiles: in the twenty-second session 104 s
# (bf16), 136 s (simulated W4A8) and 159 s (with the fused attention) for SD 1.4 at batch 8,
# three variants at once, and the packed fp8 SDXL model's first eager call alone 108 s, so
# parts a and b, with three variants and tests beside them, were cut before anything was timed.
# The compilers' caches stay in .compile_cache on the machine (benchmarks/device_call.sh): a
# part cut while compiling, run again on the same warm machine, compiles little the second time.
# CACHE_BACK=1 brings the cache back (at most 15 MB) for a fresh machine's carry.
# Each part's records come back as at most 8 files: machine.txt (every step's exit code and
# seconds), the tests' and steps' logs, and records.tgz (the JSON records, parts and suites).
set -uo pipefail
out=${1:?output folder}; part=${2:?a, b, c, d, e, f or t}
here=$(dirname "$0")
# shellcheck source=benchmarks/device_call.sh
source "$here/device_call.sh"  # the wheels, machine.txt, limited NAME LIMIT COMMAND...
case "$part" in
    a)
        ARCH=sdxl BATCH=8 T_REAL=${T_REAL:-530} \
            REAL_VARIANTS=bf16_channels_last,w4a8_layers_real_fp8_fast_packed \
            limited sdxl_b8 540 bash "$here/speed_suite.sh" "$out/sdxl_b8" real > /dev/null 2>&1 ;;
    b)
        BATCH=8 T_STEP=${T_STEP:-460} SIM_CHANNELS_LAST=1 \
            VARIANTS=bf16_channels_last,w4a8_attention_fused \
            limited first_target_b8 470 bash "$here/speed_suite.sh" "$out/first_b8" step \
            > /dev/null 2>&1
        mkdir -p "$out/attention"
        limited attention 60 python3 "$here/attention_speed.py" --arch sd14 --batch 8 \
            --largest 1 --ways sdpa,fused,before \
            --before docs/results/speed/twenty_second_session/fused_attention_1080686.py \
            --out "$out/attention/attention_speed.json" > "$out/attention_speed.txt" 2>&1 ;;
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
    t)
        limited tests_attention 200 python3 -m pytest -q -p no:cacheprovider \
            tests/engine/test_fused_attention.py > "$out/tests_attention.txt" 2>&1
        limited tests_persistent 120 python3 -m pytest -q -p no:cacheprovider \
            tests/engine/test_real_conv.py tests/engine/test_real_gemm.py -k "persistent or boxes" \
            > "$out/tests_persistent.txt" 2>&1 ;;
    *) echo "part must be a, b, c, d, e, f or t" >&2; exit 2 ;;
esac
cache_back
# at most 8 files come back: the step logs stay, the JSON records, parts and suites travel as
# one tarball
cd "$out" && records=$(find . -mindepth 2 \( -name '*.json' -o -name 'parts.tgz' \
                                           -o -name 'suite.txt' \)) \
    && { [ -z "$records" ] || { tar czf records.tgz $records && rm $records; }; }
find . -type f | sort
