"""The bit-for-bit check of ``test_bits_as_data.py``: the current engine in max mode against
``data/max_mode_reference.safetensors``, written by the engine before bits became data.

Run in a child process pinned to the instruction set the reference was written with
(:data:`REFERENCE_ISA`): oneDNN, MKL and ATen pick their float kernels by the CPU, and an
AVX-512 machine sums in another order than the AVX2 one that wrote the file, which moves a
quantized activation across a rounding boundary now and then. The pins must be set before
torch loads, hence the child process.

    python -m tests.engine.max_mode_check w8 TMPDIR   # exit 0: equal bit for bit
"""

from __future__ import annotations

import sys
from pathlib import Path

# the environment the reference file was written under (and its check runs under)
REFERENCE_ISA = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2",
                 "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OMP_WAIT_POLICY": "PASSIVE"}
REFERENCE = Path(__file__).parent / "data" / "max_mode_reference.safetensors"


def check(name: str, folder: Path) -> None:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from qlip.nn import QuantConfig, quant_units
    from qlip.pipeline import (
        CalibrationConfig,
        GenerationConfig,
        QuantizeJob,
        generate,
        quantize_pipeline,
    )
    from qlip.testing import build_tiny_pipeline

    from .make_reference import CONFIGS, PROMPTS, LengthPolicy

    torch.set_num_threads(2)
    reference = load_file(str(REFERENCE))
    pipe = build_tiny_pipeline(folder)
    job = QuantizeJob(quant=QuantConfig(**CONFIGS[name]), calibration=CalibrationConfig(
        num_prompts=2, num_inference_steps=4, num_kept_steps=2, guidance=3.0))
    units = quantize_pipeline(pipe, PROMPTS, job, folder / "q", progress=False)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 16, 32, generator=g)
    for bits in CONFIGS[name]["abits_options"]:
        for unit in units.values():
            if unit.dynamic:
                unit.set_bits(bits)
        with torch.no_grad():
            out = pipe.unet(x, 10, encoder_hidden_states=c).sample
        want = reference[f"{name}.unet.a{bits}"]
        assert torch.equal(out, want), (
            f"{name} at A{bits}: max |difference| {float((out - want).abs().max()):.3g}")
    result = generate(pipe, ["red", "a long prompt"], [0, 1], LengthPolicy(),
                      GenerationConfig(steps=3, guidance=3.0, batch_size=2), progress=False)
    images = np.stack([np.asarray(i) for i in result.images])
    assert np.array_equal(images, reference[f"{name}.images"].numpy()), f"{name}: images differ"
    assert quant_units(pipe.unet) == units


if __name__ == "__main__":
    check(sys.argv[1], Path(sys.argv[2]))
