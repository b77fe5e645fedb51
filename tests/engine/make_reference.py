"""Writes ``data/max_mode_reference.safetensors``: outputs of the engine before bits became data
(the commit before "bits as data"), for ``test_bits_as_data.py``'s bit-for-bit check. Kept to
show how the file was made: it runs against that older engine (``PYTHONPATH=<old src>``), whose
units took ``unit.abits = b``; the current engine has no such attribute.

    ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        PYTHONPATH=/path/to/old/src python tests/engine/make_reference.py

The file was written on an AVX2 machine; the check (``max_mode_check.py``) runs pinned to AVX2
kernels, so a rewrite must be too (AVX-512 kernels sum in another order).
"""

import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from qlip.nn import QuantConfig
from qlip.pipeline import (
    CalibrationConfig,
    GenerationConfig,
    QuantizeJob,
    generate,
    quantize_pipeline,
)
from qlip.policies import BitPolicy
from qlip.testing import build_tiny_pipeline

PROMPTS = ["a red circle", "two blue squares", "a star", "green"]
CONFIGS = {
    "w8": dict(wbits=8, abits=8, abits_options=(8, 16)),
    "w4log2": dict(wbits=4, abits=8, abits_options=(8, 16, 32), softmax_bits=4,
                   softmax_quantizer="log2", keep_start_token=True),
}


class LengthPolicy(BitPolicy):
    def possible_bits(self):
        return {8, 16}

    def begin(self, batch, num_steps):
        self.wants = torch.tensor([16 if len(p) > 8 else 8 for p in batch.prompts])

    def bits(self, step, timestep):
        return self.wants[:, None].expand(-1, len(self.unit_names))


def main() -> None:
    torch.set_num_threads(2)
    out = {}
    for name, config in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            pipe = build_tiny_pipeline(Path(tmp))
            job = QuantizeJob(quant=QuantConfig(**config), calibration=CalibrationConfig(
                num_prompts=2, num_inference_steps=4, num_kept_steps=2, guidance=3.0))
            units = quantize_pipeline(pipe, PROMPTS, job, Path(tmp) / "q", progress=False)
            g = torch.Generator().manual_seed(0)
            x, c = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 16, 32, generator=g)
            for bits in config["abits_options"]:
                for unit in units.values():
                    if unit.dynamic:
                        unit.abits = bits
                with torch.no_grad():
                    out[f"{name}.unet.a{bits}"] = pipe.unet(x, 10, encoder_hidden_states=c).sample
            result = generate(pipe, ["red", "a long prompt"], [0, 1], LengthPolicy(),
                              GenerationConfig(steps=3, guidance=3.0, batch_size=2), progress=False)
            out[f"{name}.images"] = torch.from_numpy(np.stack([np.asarray(i) for i in result.images]))
    save_file(out, str(Path(__file__).parent / "data" / "max_mode_reference.safetensors"))


if __name__ == "__main__":
    main()
