#!/usr/bin/env bash
# (fused_attention_before.py, the kernel at 7d6d0f9 that this call timed as "before", was
# removed in the twenty-second session: `git show 7d6d0f9:src/qlip/quant/fused_attention.py`)
# Twenty-first session, device call 4 (from the repository root on the GPU machine, $OUT set,
# .whl carried), on the session's last ~250 device seconds: the reworked fused attention kernel
# (commit 1080686) on CUDA, its kernel tests and SD 1.4's largest attention shape at batch 8
# against SDPA and the kernel as it was before this session.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD/src || exit
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/machine.txt" 2>&1
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/engine/test_fused_attention.py \
    -k "kernel or compiled" > "$OUT/tests.txt" 2>&1
echo "tests: exit $?" >> "$OUT/machine.txt"
timeout 80 python3 benchmarks/attention_speed.py --arch sd14 --batch 8 --largest 1 \
    --ways sdpa,fused,before --before docs/results/speed/twenty_first_session/fused_attention_before.py \
    --out "$OUT/attention_speed.json" > "$OUT/attention_speed.txt" 2>&1
echo "attention: exit $?" >> "$OUT/machine.txt"
