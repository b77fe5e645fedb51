"""One quantization job on a pipeline: calibration data (captured once, cached), module swap,
the method, save."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..methods.calib_data import CalibrationSet
from ..methods.rtn import RTNConfig, quantize_rtn
from ..nn import QuantConfig, QuantUnit
from .capture import capture_unet_inputs, uniform_steps
from .prepare import prepare_unet
from .saving import QuantizedInfo, save_quantized

METHODS = ("rtn",)


@dataclass
class CalibrationConfig:
    """Which UNet inputs calibrate the model (Q-Diffusion: 25 steps over the schedule)."""

    num_prompts: int = 32
    num_inference_steps: int = 25
    num_kept_steps: int = 25  # steps kept, spread uniformly over the schedule
    guidance: float = 7.5
    seed: int = 0
    batch_size: int = 8


@dataclass
class QuantizeJob:
    method: str = "rtn"
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    rtn: RTNConfig = field(default_factory=RTNConfig)
    base_model: str = ""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")


def calibration_data(
    pipe, prompts: list[str], config: CalibrationConfig, cache: Path | None, progress: bool = True
) -> CalibrationSet:
    """Capture the UNet inputs, or reuse ``cache`` when it exists (a second calibration does not
    resample)."""
    if cache is not None and cache.is_file():
        return CalibrationSet.load(cache)
    data = capture_unet_inputs(
        pipe, prompts[: config.num_prompts], config.num_inference_steps, config.guidance,
        uniform_steps(config.num_inference_steps, config.num_kept_steps), config.seed,
        config.batch_size, progress,
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        data.save(cache)
    return data


def quantize_pipeline(
    pipe, prompts: list[str], job: QuantizeJob, out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, QuantUnit]:
    """Quantize ``pipe.unet`` in place with ``job``; save to ``out_dir`` if given."""
    cache = Path(out_dir) / "calibration.safetensors" if out_dir else None
    data = calibration_data(pipe, prompts, job.calibration, cache, progress)
    units = prepare_unet(pipe.unet, job.quant)
    quantize_rtn(pipe.unet, units, data, job.rtn, progress)
    if out_dir is not None:
        info = QuantizedInfo(
            job.quant, job.method,
            {"rtn": asdict(job.rtn), "calibration": asdict(job.calibration)}, job.base_model,
        )
        save_quantized(pipe.unet, info, out_dir)
    return units
