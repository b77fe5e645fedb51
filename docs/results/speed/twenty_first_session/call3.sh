#!/usr/bin/env bash
# Twenty-first session, device call 3 (from the repository root on the GPU machine, $OUT set,
# .whl carried): the second target's deciding run, the SDXL real step at batch 8 with the packed
# fp8 model (W4 codes two per byte, the A8 Linear layers and 1×1 convs in e4m3 unpacked at every
# call, the 3×3 convs int8 on the packed bytes) against bf16 channels-last, the two alone (call
# 1 ran three real variants beside bf16 and none finished compiling within 440 s).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD/src || exit
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/machine.txt" 2>&1
start=$SECONDS
ARCH=sdxl BATCH=8 T_REAL=${T_REAL:-460} \
    REAL_VARIANTS=${REAL_VARIANTS:-bf16_channels_last,w4a8_layers_real_fp8_fast_packed} \
    bash benchmarks/speed_suite.sh "$OUT/sdxl_b8" real > /dev/null 2>&1
echo "sdxl_b8: exit $? in $((SECONDS - start)) s" >> "$OUT/machine.txt"
cd "$OUT" && records=$(find sdxl_b8 \( -name '*.json' -o -name 'parts.tgz' -o -name 'suite.txt' \)) \
    && { [ -z "$records" ] || { tar czf records.tgz $records && rm $records; }; }
find . -type f | sort
