"""One quantization job on a pipeline: calibration data (captured once, cached), module swap,
the method, save."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..files import CorruptFileError, note
from ..methods.calib_data import CalibrationSet
from ..methods.dgq import DGQConfig, quantize_dgq, table_steps
from ..methods.ptqd import PTQDConfig
from ..methods.qdiffusion import QDiffusionConfig, quantize_qdiffusion
from ..methods.rtn import RTNConfig, quantize_rtn
from ..nn import QuantConfig, QuantUnit
from .cache import differences, digest
from .capture import capture_unet_inputs, uniform_steps
from .prepare import prepare_unet
from .prompts import check_prompts, truncation_note
from .ptqd_sampling import gather_correction_statistics
from .saving import QuantizedInfo, fingerprint, load_quantized_weights, save_quantized

METHODS = ("rtn", "qdiffusion", "ptqd", "dgq")
# The QuantConfig each method's paper implies, where the caller says nothing else (the CLI
# fills its unset flags from here).
METHOD_QUANT_DEFAULTS: dict[str, dict] = {
    "rtn": {}, "qdiffusion": {},
    "ptqd": {"preset": "ptqd", "weight_per_channel": False},
    "dgq": {"preset": "dgq", "softmax_quantizer": "log2", "softmax_follows_abits": True,
            "keep_start_token": True},
}


@dataclass
class CalibrationConfig:
    """Which UNet inputs calibrate the model (Q-Diffusion: 25 steps over the schedule)."""

    num_prompts: int = 32
    num_inference_steps: int = 25
    num_kept_steps: int = 25  # steps kept, spread uniformly over the schedule
    guidance: float = 7.5
    seed: int = 0
    batch_size: int = 8
    truncate: bool = False  # cut prompts over the tokenizer's limit instead of refusing them
    height: int | None = None  # pixels; None: the pipeline's own resolution
    width: int | None = None


@dataclass
class QuantizeJob:
    method: str = "rtn"
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    rtn: RTNConfig = field(default_factory=RTNConfig)
    qdiffusion: QDiffusionConfig = field(default_factory=QDiffusionConfig)
    ptqd: PTQDConfig = field(default_factory=PTQDConfig)
    dgq: DGQConfig = field(default_factory=DGQConfig)
    base_model: str = ""
    # A quantized model folder whose weights (codes and grids) are reused: the weight
    # calibration and reconstruction are skipped, the activations are calibrated anew.
    weights_from: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")
        if self.weights_from and self.method == "rtn":
            raise ValueError("weights_from reuses a reconstruction: use it with qdiffusion, ptqd "
                             "or dgq")
        if self.quant.act_groups > 1 and self.method != "dgq":
            raise ValueError(f"grouped activations (act_groups={self.quant.act_groups}) are "
                             "calibrated by DGQ: use method 'dgq' (`--method dgq --groups G`)")
        if self.method == "dgq" and (
                self.calibration.num_kept_steps < self.calibration.num_inference_steps):
            raise ValueError("DGQ calibrates a table row per sampling step: keep every step "
                             f"(--calib-kept-steps {self.calibration.num_inference_steps}, got "
                             f"{self.calibration.num_kept_steps})")
        if self.method == "ptqd" and (self.quant.preset != "ptqd" or self.quant.weight_per_channel):
            raise ValueError(
                "PTQD quantizes weights per tensor with its own layer policy: use "
                "QuantConfig(preset='ptqd', weight_per_channel=False) (the CLI does this for "
                "--method ptqd)"
            )

    def method_config(self) -> dict:
        """The chosen method's config, as saved in ``quant_config.json``."""
        config = {"rtn": self.rtn, "qdiffusion": self.qdiffusion, "ptqd": self.ptqd,
                  "dgq": self.dgq}[self.method]
        return {self.method: asdict(config), "calibration": asdict(self.calibration),
                "weights_from": self.weights_from}

    def quant_for(self, data: CalibrationSet) -> QuantConfig:
        """The layer config the model is prepared with: DGQ's per-step tables get one row per
        sampling step of ``data`` (a given ``act_steps`` must agree)."""
        if self.method != "dgq":
            return self.quant
        steps = table_steps(data)
        if self.quant.act_steps not in (None, steps):
            raise ValueError(f"act_steps={self.quant.act_steps} but the calibration data has "
                             f"{steps} sampling steps; leave act_steps unset for DGQ")
        return replace(self.quant, act_steps=steps)


def calibration_fingerprint(pipe, prompts: list[str], config: CalibrationConfig) -> dict:
    """What a calibration capture is made from: the base UNet, the prompts and every setting."""
    return {"model": fingerprint(pipe.unet), "scheduler": type(pipe.scheduler).__name__,
            "prompts": digest(prompts[: config.num_prompts]), **asdict(config)}


def _reusable(cache: Path, wanted: dict) -> bool:
    """Does the capture in ``cache`` come from ``wanted``? Says which, and why not."""
    try:
        saved = CalibrationSet.saved_fingerprint(cache)
    except CorruptFileError as err:
        note(f"{err}: capturing anew")
        return False
    if saved == wanted:
        note(f"reusing the calibration capture {cache} (same model, prompts and settings)")
        return True
    if saved is None:
        note(f"{cache} does not record what it was captured from (an older qlip, or not a "
             "calibration set); capturing anew")
    else:
        changes = "; ".join(differences(saved, wanted)[:4])
        note(f"{cache} was captured from other inputs ({changes}); capturing anew")
    return False


def calibration_data(
    pipe, prompts: list[str], config: CalibrationConfig, cache: Path | None, progress: bool = True
) -> CalibrationSet:
    """Capture the UNet inputs, or reuse ``cache`` when it was captured from the same model,
    prompts and settings (its fingerprint); a cache of other inputs is captured anew."""
    wanted = calibration_fingerprint(pipe, prompts, config)
    if cache is not None and cache.is_file() and _reusable(cache, wanted):
        return CalibrationSet.load(cache)
    # keeping every step keeps every UNet call (PNDM makes one more call than steps)
    keep = (None if config.num_kept_steps >= config.num_inference_steps
            else uniform_steps(config.num_inference_steps, config.num_kept_steps))
    data = capture_unet_inputs(
        pipe, prompts[: config.num_prompts], config.num_inference_steps, config.guidance, keep,
        config.seed, config.batch_size, progress, config.height, config.width,
    )
    if cache is not None:  # atomically: jobs sharing one cache may capture at the same time
        cache.parent.mkdir(parents=True, exist_ok=True)
        data.save(cache, wanted)
    return data


def quantize_pipeline(
    pipe, prompts: list[str], job: QuantizeJob, out_dir: str | Path | None = None,
    progress: bool = True, calibration_cache: str | Path | None = None,
) -> dict[str, QuantUnit]:
    """Quantize ``pipe.unet`` in place with ``job``; save to ``out_dir`` if given. The captured
    calibration data is cached at ``calibration_cache`` (default: in ``out_dir``), so several
    settings of one model can share one capture. Returns the units."""
    return run_quantize_job(pipe, prompts, job, out_dir, progress, calibration_cache)[0]


def run_quantize_job(
    pipe, prompts: list[str], job: QuantizeJob, out_dir: str | Path | None = None,
    progress: bool = True, calibration_cache: str | Path | None = None,
) -> tuple[dict[str, QuantUnit], QuantizedInfo]:
    """:func:`quantize_pipeline`, also returning what a save records (the method's extra state:
    PTQD's statistics), for callers that sample the model without loading it again."""
    over = check_prompts(pipe, prompts, job.calibration.truncate)
    if over:
        note(truncation_note(over, len(prompts), pipe.tokenizer.model_max_length))
    cache = calibration_cache or (Path(out_dir) / "calibration.safetensors" if out_dir else None)
    data = calibration_data(pipe, prompts, job.calibration, Path(cache) if cache else None, progress)
    quant = job.quant_for(data)
    units = prepare_unet(pipe.unet, quant)
    if job.weights_from:
        load_quantized_weights(pipe.unet, units, quant, job.weights_from)
    extra = {}
    if job.method == "rtn":
        quantize_rtn(pipe.unet, units, data, job.rtn, progress)
    elif job.method == "dgq":
        quantize_dgq(pipe.unet, units, data, job.dgq, out_dir, progress,
                     weights_ready=bool(job.weights_from))
    else:  # PTQD = Q-Diffusion's recipe + correction statistics
        recipe = job.qdiffusion if job.method == "qdiffusion" else job.ptqd.qdiffusion
        quantize_qdiffusion(pipe.unet, units, data, recipe, out_dir, progress,
                            weights_ready=bool(job.weights_from))
    if job.method == "ptqd":
        extra = gather_correction_statistics(pipe, units, prompts, job.ptqd, progress).to_extra()
    info = QuantizedInfo(quant, job.method, job.method_config(), job.base_model, extra)
    if out_dir is not None:
        save_quantized(pipe.unet, info, out_dir)
    return units, info
