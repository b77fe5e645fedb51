#!/usr/bin/env bash
# Twentieth session, device call 1 (from the repository root on the GPU machine, $OUT set, .whl
# carried): the persistent conv kernel's and fp8's tests on CUDA, the 3×3 conv shapes' tiles
# (one tile a program, persistent, bf16; replayed from a CUDA graph), then the SD 1.4 real step
# at batch 8 with the persistent kernels by default, without the persistent conv, and fp8.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD/src || exit
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/machine.txt" 2>&1
start=$SECONDS
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/engine/test_real_fp8.py \
  tests/engine/test_real_conv.py -k "fp8 or persistent or boxes" > "$OUT/tests.txt" 2>&1
echo "tests: exit $? in $((SECONDS - start)) s" >> "$OUT/machine.txt"
start=$SECONDS
timeout ${T_SWEEP:-150} python3 benchmarks/real_tile_sweep.py --kinds conv \
  --tiles "128,128,64,8,4 128,128,128,8,4 128,256,64,8,3 128,256,128,8,3 64,128,64,4,3 128,64,128,4,4" \
  --out "$OUT/conv_tile_sweep.json" > "$OUT/conv_tile_sweep.txt" 2>&1
echo "conv sweep: exit $? in $((SECONDS - start)) s" >> "$OUT/machine.txt"
T_REAL=${T_REAL:-330} \
  REAL_VARIANTS=${REAL_VARIANTS:-bf16_channels_last,w4a8_layers_real,w4a8_layers_real_conv_one_tile,w4a8_layers_real_fp8_fast} \
  bash benchmarks/speed_suite.sh "$OUT/sd14" real
