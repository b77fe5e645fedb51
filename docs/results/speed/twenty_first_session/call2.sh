#!/usr/bin/env bash
# (fused_attention_before.py, the kernel at 7d6d0f9 that this call timed as "before", was
# removed in the twenty-second session: `git show 7d6d0f9:src/qlip/quant/fused_attention.py`)
# Twenty-first session, device call 2 (from the repository root on the GPU machine, $OUT set,
# .whl carried): issue 14's first target with the reworked fused attention kernel.
#  1. the fused attention's tests on CUDA (the kernel against the fp32 reference, bf16, compiled)
#  2. SD 1.4's attention shapes at batch 8 alone (benchmarks/attention_speed.py): SDPA bf16, the
#     materialised fake-quantized path, the fused kernel now and as it was before this session
#  3. the first target: simulated W4A8 ± attention (materialised, fused), compiled, SD 1.4 batch
#     8, the simulated variants channels-last as the bf16 baseline (SIM_CHANNELS_LAST=1)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD/src || exit
here=docs/results/speed/twenty_first_session
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/machine.txt" 2>&1
timed() {  # timed NAME LIMIT COMMAND...: one step, its exit code and seconds in machine.txt
    local name=$1 limit=$2 start=$SECONDS; shift 2
    timeout "$limit" "$@"; echo "$name: exit $? in $((SECONDS - start)) s" >> "$OUT/machine.txt"
}
timed tests 60 python3 -m pytest -q -p no:cacheprovider tests/engine/test_fused_attention.py \
    > "$OUT/tests.txt" 2>&1
timed attention ${T_ATTENTION:-200} python3 benchmarks/attention_speed.py --arch sd14 --batch 8 \
    --before "$here/fused_attention_before.py" --out "$OUT/attention_speed.json" \
    > "$OUT/attention_speed.txt" 2>&1
BATCH=8 T_STEP=${T_STEP:-250} SIM_CHANNELS_LAST=1 \
    VARIANTS=bf16_channels_last,w4a8_layers,w4a8_attention,w4a8_attention_fused \
    timed first_target_b8 260 bash benchmarks/speed_suite.sh "$OUT/first_b8" step > /dev/null 2>&1
# (a call brings back at most 8 files: the step's JSON records and parts travel as one tarball)
cd "$OUT" && records=$(find first_b8 \( -name '*.json' -o -name 'parts.tgz' -o -name 'suite.txt' \)) \
    && { [ -z "$records" ] || { tar czf records.tgz $records && rm $records; }; }
find . -type f | sort
