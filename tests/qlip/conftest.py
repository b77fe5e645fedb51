"""Tiny-UNet QLIP tests run on one torch thread (many small ops; other jobs share the CPU)."""

import pytest

from ..conftest import single_torch_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)


def save_w4_model(template, pipe_dir, folder, bits, abits, prompts):
    """A W4 RTN model of the tiny pipeline with the activation bank ``bits``, saved in
    ``folder`` (what the QLIP tests train on); returns ``folder``."""
    import copy

    from qlip.nn import QuantConfig
    from qlip.pipeline import CalibrationConfig, QuantizeJob, quantize_pipeline

    job = QuantizeJob(quant=QuantConfig(wbits=4, abits=abits, abits_options=bits),
                      calibration=CalibrationConfig(num_prompts=2, num_inference_steps=3,
                                                    num_kept_steps=2, guidance=3.0),
                      base_model=str(pipe_dir))
    quantize_pipeline(copy.deepcopy(template), list(prompts), job, folder, progress=False)
    return folder
