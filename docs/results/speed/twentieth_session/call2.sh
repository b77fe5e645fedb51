#!/usr/bin/env bash
# Twentieth session, device call 2 (from the repository root on the GPU machine, $OUT set, .whl
# carried): the SDXL UNet's real step at batch 8 (ARCH, BATCH, REAL_VARIANTS, T_REAL override).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD/src || exit
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/machine.txt" 2>&1
ARCH=${ARCH:-sdxl} BATCH=${BATCH:-8} T_REAL=${T_REAL:-540} \
  REAL_VARIANTS=${REAL_VARIANTS:-bf16_channels_last,w4a8_layers_real,w4a8_layers_real_fp8_fast} \
  bash benchmarks/speed_suite.sh "$OUT/${ARCH:-sdxl}" real
