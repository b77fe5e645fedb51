#!/usr/bin/env bash
# Twentieth session, device call 3 (from the repository root on the GPU machine, $OUT set, .whl
# carried): issue 14's first target, simulated W4A8 with attention quantized, compiled, against
# bf16 channels-last, SD 1.4 at batch 8 then 2 (T_STEP each).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD/src || exit
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/machine.txt" 2>&1
for b in ${BATCHES:-8 2}; do
  BATCH=$b T_STEP=${T_STEP:-270} \
    VARIANTS=${VARIANTS:-bf16_channels_last,w4a8_layers,w4a8_attention,w4a8_attention_fused} \
    bash benchmarks/speed_suite.sh "$OUT/b$b" step
done
# (a call brings back at most 8 files: the JSON records and parts travel as one tarball)
cd "$OUT" && records=$(find b* \( -name '*.json' -o -name 'parts.tgz' \)) && tar czf records.tgz $records && rm $records
