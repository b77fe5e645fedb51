"""Tiny random diffusers pipelines built from configs; nothing is downloaded."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# OpenMP threads that spin while they wait make every small op take milliseconds when other
# work shares the cores (CI may be loaded): wait passively. Must precede the torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from qlip.testing import build_tiny_pipeline  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The Triton kernels launch with their first tile, as under the interpreter: autotuning would
# compile every tile for every shape and flag the tests use (minutes on the GPU).
# tests/engine/test_kernel_autotune.py runs the tuned launch path itself.
os.environ.setdefault("QLIP_AUTOTUNE", "0")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def _tiny_pipeline_template(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def tiny_pipe(_tiny_pipeline_template):
    """A fresh copy of the tiny pipeline (tests quantize it in place)."""
    return copy.deepcopy(_tiny_pipeline_template)


@pytest.fixture(scope="session")
def tiny_pipe_dir(_tiny_pipeline_template, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_pipe")
    _tiny_pipeline_template.save_pretrained(folder)
    return folder


def unet_inputs(unet, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    t = torch.tensor([500] * batch)
    c = torch.randn(batch, 16, unet.config.cross_attention_dim, generator=g)
    return x, t, c


def snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (ref - out).norm()))


def single_torch_thread():
    """One torch thread while a test module runs: many small ops on a tiny UNet run faster so,
    and stay fast when other jobs share the CPU. Use as ``pytest.fixture(...)(single_torch_thread)``
    in a package's conftest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (benchmarks/ is not a package), with
    benchmarks/ on ``sys.path`` while it loads, as when it runs as a script."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def on(t, device):
    """``t`` on ``device``; None stays None (a real layer's centered weights have no zero
    points)."""
    return None if t is None else t.to(device)


def kernel_device() -> str | None:
    """Where qlip's Triton kernels can run: "cuda", the CPU under TRITON_INTERPRET=1, or None."""
    from qlip.quant.fused_quantize import triton

    if triton is None:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


def assert_same_epilogue(persistent: torch.Tensor, plain: torch.Tensor, bias: bool,
                         device: str | None) -> None:
    """The persistent kernels' outputs against the one-tile kernels': bit-equal, except with a
    bias on CUDA, where they differ in fp32's last bit. On an H100 (twentieth session) the two
    were not bit-equal with a bias, bit-equal without: most likely the compiler fuses the scaling
    and the bias into one FMA in the persistent epilogue (one rounding where the one-tile kernel,
    adding the bias after its branch, rounds twice)."""
    if bias and device == "cuda":
        torch.testing.assert_close(persistent, plain, rtol=2.5e-7, atol=1e-6)
    else:
        assert torch.equal(persistent, plain)


def kernel_unet(tiny_pipe, monkeypatch, config, spy: tuple | None = None):
    """The tiny UNet quantized with ``config`` (RTN) on :func:`kernel_device`, with the kernels
    let onto CPU tensors under the interpreter; ``spy = (module, name)`` counts the calls of
    ``module.name``. Returns (unet, units, calls, (x, t, c) inputs of two images)."""
    from qlip.methods.calib_data import CalibrationSet
    from qlip.methods.rtn import quantize_rtn
    from qlip.pipeline import prepare_unet
    from qlip.quant import fused_quantize

    device = kernel_device()
    if device == "cpu":  # the interpreter runs the kernels on CPU tensors
        monkeypatch.setattr(fused_quantize, "available", lambda x: x.dtype in fused_quantize.DTYPES)
    unet = tiny_pipe.unet.to(device)
    units = prepare_unet(unet, config)
    x, t, c = (v.to(device) for v in unet_inputs(unet, 4, seed=1))
    quantize_rtn(unet, units, CalibrationSet(x, t.float(), c, torch.zeros(4, dtype=torch.long)),
                 progress=False)
    calls: list[int] = []
    if spy is not None:
        module, name = spy
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return unet, units, calls, tuple(v.to(device) for v in unet_inputs(unet, 2, seed=2))
