"""The diffusers seam: the only part of qlip that knows pipelines."""

from .accounting import BitLedger, ImageReport, MacCounter
from .attach import AttachedQuantization, attach_quantization, detach_quantization
from .capture import capture_unet_inputs, uniform_steps
from .generate import GenerationConfig, GenerationResult, generate
from .loading import ModelLoadError, load_pipeline, register_model, registered_models
from .prepare import decoder_input_splits, prepare_unet
from .ptqd_sampling import PTQDScheduler, apply_ptqd, gather_correction_statistics, remove_ptqd
from .quantize import CalibrationConfig, QuantizeJob, quantize_pipeline
from .quantized_model import load_for_sampling
from .saving import QuantizedInfo, load_quantized, save_quantized
from .session import SamplingRecord, SamplingSession

__all__ = [
    "AttachedQuantization",
    "SamplingRecord",
    "SamplingSession",
    "attach_quantization",
    "detach_quantization",
    "BitLedger",
    "CalibrationConfig",
    "GenerationConfig",
    "GenerationResult",
    "ImageReport",
    "MacCounter",
    "PTQDScheduler",
    "ModelLoadError",
    "QuantizeJob",
    "QuantizedInfo",
    "apply_ptqd",
    "capture_unet_inputs",
    "decoder_input_splits",
    "gather_correction_statistics",
    "generate",
    "load_for_sampling",
    "load_pipeline",
    "load_quantized",
    "prepare_unet",
    "quantize_pipeline",
    "register_model",
    "registered_models",
    "remove_ptqd",
    "save_quantized",
    "uniform_steps",
]
