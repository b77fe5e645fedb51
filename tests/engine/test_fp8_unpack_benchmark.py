"""benchmarks/fp8_unpack_cost.py's hand-written unpacking kernel (packed 4-bit bytes to centered
e4m3 weights in one pass), timed there against Inductor's: its values must be
``real_fp8.fp8_weight_matrix``'s exactly, or the timing compares different work."""

import pytest
import torch

from qlip.quant import real_fp8
from qlip.quant.real_gemm import pack_rows

from ..conftest import kernel_device, load_benchmark


@pytest.mark.skipif(kernel_device() is None,
                    reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")
@pytest.mark.parametrize("n, k", [(64, 96), (40, 30), (33, 2048)])  # whole, partial, odd rows
def test_the_triton_unpacking_equals_fp8_weight_matrix(n, k):
    bench = load_benchmark("fp8_unpack_cost")
    device = kernel_device()
    g = torch.Generator().manual_seed(n + k)
    codes = torch.randint(0, 16, (n, k), generator=g)
    zero = torch.randint(0, 16, (n,), generator=g).to(torch.int32)
    packed = pack_rows(codes).to(device)
    got = bench.unpack_triton(packed, zero.to(device), k).float().cpu()
    want = real_fp8.fp8_weight_matrix(packed.cpu(), zero, k).float()
    assert torch.equal(got, want)
    assert torch.equal(want, (codes - zero[:, None]).float())  # the centered codes, exact in e4m3
