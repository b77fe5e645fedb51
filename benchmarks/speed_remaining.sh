#!/usr/bin/env bash
# Issue 14's measurements, as device calls of at most ~9.5 minutes each (from the repository root
# on the GPU machine, .whl carried). Still missing after the twenty-fourth session, in order:
# u (the restored kernel loops' CUDA tests and time), c (SD 1.4 real at batch 1), f (the weight
# memory on CUDA, the first target at batch 2), d, q, e. Done: b and a (both targets' steps),
# p's question answered by a (the packed step's loss was the unpacking: real_gemm.UNPACK_PACKED,
# now the default, took it to 0.944×), c at batch 2.
#   bash benchmarks/speed_remaining.sh "$OUT" b
#     the first target alone: simulated W4A8 with attention (the fused kernel, compiled,
#     channels-last) beside bf16 channels-last at batch 8, the two alone with most of the call;
#     then SD 1.4's largest attention shape alone (benchmarks/attention_speed.py --largest 1:
#     SDPA, the fused kernel now and at 1080686). Done in the twenty-third session: 1.298×
#     (met); the kernel at 1080686 7% faster than 528aa8f's loops, which were reverted since
#   ... a   the SDXL real step at batch 8, the packed fp8 model (its bytes unpacked by one Triton
#           launch a layer and call, real_gemm.UNPACK_PACKED, the default) beside bf16
#           channels-last, the two alone with most of the call: the second target's step,
#           0.944× [0.933, 0.950] in the twenty-fourth session (met). A_VARIANTS picks others,
#           e.g. ..._fp8_fast_packed (UNPACK_PACKED off: Inductor's unpacking for the fp8 layers,
#           in-register for the int8 3×3 convs; 1.098× in the twenty-third session)
#   ... c   the SD 1.4 real step at C_BATCHES (default 1; batch 2 ran in the twenty-fourth
#           session, where batch 1 was cut after bf16 at 250 s a batch) (bf16, int8, fp8)
#   ... d   the SDXL real step at batch 1 (bf16, int8, packed fp8 as the library runs it; two
#           real variants at most beside bf16 finish compiling within the limit)
#   ... e   SDXL's Linear and 3×3 conv shapes alone (benchmarks/real_tile_sweep.py --arch
#           sdxl): the persistent kernels' tiles against cuBLAS's and cuDNN's bf16 there
#   ... f   the weight memory on CUDA (the packed fp8 model's allocation; cut at 90 s in the
#           twenty-fourth session); the first target at batch 2, its two variants alone (four
#           variants at once were still compiling at 240 s)
#   ... u   the fused attention's CUDA tests (the loops of 1080686 again; the twenty-fourth
#           session's 60 s on a fresh machine passed 7 before the limit), then SD 1.4's largest
#           attention shape, the kernel now beside 1080686's (55 s was not enough to compile
#           on a fresh machine); T_UNPACK>0 adds benchmarks/fp8_unpack_cost.py (SDXL b8, run in
#           the twenty-fourth session: the packed step's fp8 GEMMs 59.6 ms with Inductor's
#           unpacking, 53.2 with the one-launch unpacking, 51.2 on unpacked e4m3)
#   ... p   where the packed fp8 SDXL step's time goes at batch 8 (benchmarks/step_profile.py,
#           eager with the kernels and tiles of a CUDA graph's capture, no compile): GPU time
#           by kind of kernel for bf16, fp8 on unpacked codes, fp8 packed (PyTorch's unpacking,
#           unfused in eager), fp8 packed with real_gemm.UNPACK_PACKED (every layer's bytes
#           unpacked by one launch a call); chiefly whether the int8 3×3 convs lose on packed
#           bytes (SD 1.4's packed int8 step ran 1.66× where the unpacked one ran 1.32×,
#           seventeenth session)
#   ... t   the CUDA tests of the fused attention and the persistent kernels (both passed in the
#           twenty-second session)
#   ... q   what fp8 does to images at 2,000 prompts on the GPU (issue 14 item 3; the nineteenth
#           session's CPU pair at 400 prompts tied): an RTN W4A8 reference model (every option
#           A8, so its Linear layers and 1×1 convs take fp8) evaluated with `--real-kernels`
#           (int8, the simulation's values up to rounding) and `--real-kernels --fp8`, beside an
#           FP eval, then `qlip compare` of the two, in RUN (default runs/fp8q; every eval
#           resumes, so a cut part is run again). `--fp8` without fast accumulation: on the SD 1.4
#           step the fast and plain fp8 outputs differed from the simulation by the same mean
#           |Δ| (0.01748 and 0.01750, nineteenth session). The features come back
#           (features.tgz) for comparisons here.
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
out=${1:?output folder}; part=${2:?a, b, c, d, e, f, p, q, t or u}
here=$(dirname "$0")
# shellcheck source=benchmarks/device_call.sh
source "$here/device_call.sh"  # the wheels, machine.txt, limited NAME LIMIT COMMAND...
largest_attention() {  # SD 1.4's largest attention shape: SDPA, the kernel now and at 1080686
    mkdir -p "$out/attention"
    limited attention "$1" python3 "$here/attention_speed.py" --arch sd14 --batch 8 \
        --largest 1 --ways sdpa,fused,before \
        --before docs/results/speed/twenty_second_session/fused_attention_1080686.py \
        --out "$out/attention/attention_speed.json" > "$out/attention_speed.txt" 2>&1
}
attention_tests() {  # the fused attention's CUDA tests, within $1 seconds
    limited tests_attention "$1" python3 -m pytest -q -p no:cacheprovider \
        tests/engine/test_fused_attention.py > "$out/tests_attention.txt" 2>&1
}
case "$part" in
    a)
        ARCH=sdxl BATCH=8 T_REAL=${T_REAL:-530} \
            REAL_VARIANTS=${A_VARIANTS:-bf16_channels_last,w4a8_layers_real_fp8_fast_packed_unpack} \
            limited sdxl_b8 540 bash "$here/speed_suite.sh" "$out/sdxl_b8" real > /dev/null 2>&1 ;;
    b)
        BATCH=8 T_STEP=${T_STEP:-460} SIM_CHANNELS_LAST=1 \
            VARIANTS=bf16_channels_last,w4a8_attention_fused \
            limited first_target_b8 470 bash "$here/speed_suite.sh" "$out/first_b8" step \
            > /dev/null 2>&1
        largest_attention 60 ;;
    c)
        batches=${C_BATCHES:-1}; nb=$(wc -w <<< "$batches"); each=$(( 510 / nb ))
        for b in $batches; do
            BATCH=$b T_REAL=${T_REAL:-$(( each - 10 ))} \
                REAL_VARIANTS=bf16_channels_last,w4a8_layers_real,w4a8_layers_real_fp8_fast \
                limited "sd14_real_b$b" "$each" bash "$here/speed_suite.sh" "$out/real_b$b" real \
                > /dev/null 2>&1
        done ;;
    d)
        ARCH=sdxl BATCH=1 T_REAL=${T_REAL:-500} \
            REAL_VARIANTS=bf16_channels_last,w4a8_layers_real,w4a8_layers_real_fp8_fast_packed_unpack \
            limited sdxl_b1 510 bash "$here/speed_suite.sh" "$out/sdxl_b1" real > /dev/null 2>&1 ;;
    e)
        limited sweep 540 python3 "$here/real_tile_sweep.py" --arch sdxl --kinds linear,conv \
            --tiles "128,128,128,8,4 128,256,128,8,3 128,256,64,8,3 128,128,64,8,4 64,128,64,4,3" \
            --out "$out/sdxl_tile_sweep.json" > "$out/sdxl_tile_sweep.txt" 2>&1 ;;
    f)
        limited memory "${T_MEMORY:-200}" python3 "$here/weight_memory.py" --device cuda \
            --out "$out/weight_memory.json" > "$out/weight_memory.txt" 2>&1
        BATCH=2 T_STEP=${T_STEP:-320} SIM_CHANNELS_LAST=1 \
            VARIANTS=${F_VARIANTS:-bf16_channels_last,w4a8_attention_fused} \
            limited first_target_b2 "$(( ${T_STEP:-320} + 10 ))" \
            bash "$here/speed_suite.sh" "$out/first_b2" step > /dev/null 2>&1 ;;
    u)
        attention_tests "${T_TESTS:-240}"
        largest_attention "${T_ATTENTION:-150}"
        if [ "${T_UNPACK:-0}" -gt 0 ]; then
            limited unpack "$T_UNPACK" python3 "$here/fp8_unpack_cost.py" --arch sdxl --batch 8 \
                --out "$out/unpack/fp8_unpack_cost.json" > "$out/fp8_unpack_cost.txt" 2>&1
        fi ;;
    p)
        limited profile ${T_PROFILE:-420} python3 "$here/step_profile.py" --arch sdxl --batch 8 \
            --no-compile --as-captured --steps 3 --warmup 2 \
            --variants bf16_channels_last,w4a8_layers_real_fp8_fast,w4a8_layers_real_fp8_fast_packed,w4a8_layers_real_fp8_fast_packed_unpack \
            --out "$out/profile/step_profile_sdxl_b8.json" > "$out/step_profile.txt" 2>&1 ;;
    t)
        attention_tests 200
        limited tests_persistent 120 python3 -m pytest -q -p no:cacheprovider \
            tests/engine/test_real_conv.py tests/engine/test_real_gemm.py -k "persistent or boxes" \
            > "$out/tests_persistent.txt" 2>&1 ;;
    q)
        run=${RUN:-runs/fp8q}; mkdir -p "$run/logs"
        # (a CPU smoke test: DEVICE=cpu REAL= N=8 STEPS=2 QUANT_EXTRA="--calib-num 2 --calib-steps 2
        # --calib-kept-steps 2", fp8 GEMMs beside the simulation)
        real=${REAL---real-kernels}
        common=(--model reference --device "${DEVICE:-cuda}" --prompts heldout
                --num-images "${N:-2000}" --batch-size 250 --steps "${STEPS:-25}" --guidance 4
                --batch-mode max)
        [ -e "$run/eval_fp/metrics.json" ] || (limited eval_fp 200 python3 -m qlip.cli eval \
            "${common[@]}" --label FP --out "$run/eval_fp" > "$run/logs/eval_fp.txt" 2>&1) &
        # shellcheck disable=SC2086
        [ -e "$run/q_rtn_w4a8/quant_state.safetensors" ] || limited quantize "${T_QUANTIZE:-120}" \
            python3 -m qlip.cli quantize --model reference --device "${DEVICE:-cuda}" \
            --method rtn --wbits 4 --abits 8 ${QUANT_EXTRA:-} --out "$run/q_rtn_w4a8" \
            > "$run/logs/quantize.txt" 2>&1
        wait
        # shellcheck disable=SC2206
        quantized=(--quantized "$run/q_rtn_w4a8" $real --reference-run "$run/eval_fp")
        limited eval_int8 180 python3 -m qlip.cli eval "${common[@]}" "${quantized[@]}" \
            --label "RTN W4A8, real int8" --out "$run/eval_int8" > "$run/logs/eval_int8.txt" 2>&1
        limited eval_fp8 180 python3 -m qlip.cli eval "${common[@]}" "${quantized[@]}" --fp8 \
            --label "RTN W4A8, real int8 and fp8 A8 GEMMs" --out "$run/eval_fp8" \
            > "$run/logs/eval_fp8.txt" 2>&1
        limited compare 60 python3 -m qlip.cli compare "$run/eval_fp8" "$run/eval_int8" \
            --resamples 2000 --json "$out/compare_fp8_vs_int8.json" \
            > "$out/compare_fp8_vs_int8.md" 2> "$run/logs/compare.txt"
        # the logs in records.tgz (a call returns at most 8 files)
        FEATURES="eval_fp eval_int8 eval_fp8" bash "$here/collect_records.sh" "$run" "$out/c" \
            > /dev/null ;;
    *) echo "part must be a, b, c, d, e, f, p, q, t or u" >&2; exit 2 ;;
esac
cache_back
# at most 8 files come back: the step logs stay, the JSON records, parts and suites travel as
# one tarball
cd "$out" && records=$(find . -mindepth 2 \( -name '*.json' -o -name 'parts.tgz' \
                                           -o -name 'suite.txt' \)) \
    && { [ -z "$records" ] || { tar czf records.tgz $records && rm $records; }; }
find . -type f | sort
