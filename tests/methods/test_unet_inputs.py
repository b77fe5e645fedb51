"""One path for UNet calls: an SDXL-like UNet's conditioning (``added_cond_kwargs``) survives
capture → save → load → ``call_unet``, and every method path (RTN calibration, Q-Diffusion's
reconstruction and activation passes, PTQD's statistics) hands it to the UNet."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from qlip.methods.brecq import ReconstructionConfig
from qlip.methods.calib_data import CalibrationSet
from qlip.methods.ptqd import PTQDConfig
from qlip.methods.qdiffusion import QDiffusionConfig
from qlip.methods.unet_inputs import UNetInputs, call_unet
from qlip.nn import QuantConfig
from qlip.pipeline import CalibrationConfig, QuantizeJob, capture_unet_inputs, quantize_pipeline
from qlip.testing import build_tiny_sdxl_pipeline

PROMPTS = ["a red circle", "two blue squares"]
ADDED = {"added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


class _Outputs:
    """Forward hook: the UNet's prediction at every call the pipeline makes."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def __call__(self, module, args, output):
        self.calls.append(output[0].detach().clone())


def test_sdxl_conditioning_survives_capture_save_load_and_call(sdxl, tmp_path):
    outputs = _Outputs()
    handle = sdxl.unet.register_forward_hook(outputs)
    try:
        data = capture_unet_inputs(sdxl, PROMPTS, num_inference_steps=3, guidance_scale=3.0,
                                   keep_steps=[0, 2], batch_size=2, progress=False)
    finally:
        handle.remove()
    assert len(data) == 2 * 2 * 2  # prompts × guidance halves × kept steps
    assert set(data.conditioning) == ADDED
    assert data.conditioning["added_cond_kwargs.time_ids"].shape == (8, 6)
    data.save(tmp_path / "calibration.safetensors")
    loaded = CalibrationSet.load(tmp_path / "calibration.safetensors")
    assert set(loaded.conditioning) == ADDED
    assert all(torch.equal(loaded.conditioning[k], data.conditioning[k]) for k in ADDED)
    with torch.no_grad():
        replayed = call_unet(sdxl.unet, loaded.inputs())
    # the pipeline's own predictions at the kept calls (0 and 2 of one batch of two prompts)
    assert torch.allclose(replayed, torch.cat([outputs.calls[i] for i in (0, 2)]), atol=1e-5)
    shifted = loaded.inputs()
    shifted.added_cond_kwargs["time_ids"] = shifted.added_cond_kwargs["time_ids"] + 16.0
    with torch.no_grad():
        assert not torch.allclose(call_unet(sdxl.unet, shifted), replayed, atol=1e-3)


class _ConditioningSpy:
    """UNet pre-hook: every call must carry SDXL's conditioning with one row per sample."""

    def __init__(self):
        self.calls = 0

    def __call__(self, module, args, kwargs):
        inputs = UNetInputs.from_call(args, kwargs)
        added = inputs.added_cond_kwargs
        assert set(added) == {"text_embeds", "time_ids"}, f"call {self.calls} dropped them"
        assert all(v.shape[0] == inputs.batch_size for v in added.values())
        self.calls += 1


@pytest.mark.parametrize("method", ["rtn", "ptqd"])
def test_every_method_path_passes_added_cond_kwargs(sdxl, method, tmp_path):
    # ptqd runs Q-Diffusion's reconstruction, activation passes and Δ tuning, then PTQD's
    # statistics: every path that calls the UNet
    pipe = copy.deepcopy(sdxl)
    recipe = QDiffusionConfig(
        reconstruction=ReconstructionConfig(iters=2, batch_size=2, num_samples=4),
        act_init_samples=2, act_init_values=512, act_tune_iters=1, act_tune_samples=2)
    job = QuantizeJob(
        method=method,
        quant=QuantConfig(wbits=8, abits=8, preset="ptqd" if method == "ptqd" else "qdiffusion",
                          weight_per_channel=method != "ptqd"),
        calibration=CalibrationConfig(num_prompts=2, num_inference_steps=2, num_kept_steps=2,
                                      guidance=3.0),
        ptqd=PTQDConfig(qdiffusion=recipe, num_prompts=2, num_steps=2, guidance=3.0),
    )
    spy = _ConditioningSpy()
    handle = pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        quantize_pipeline(pipe, PROMPTS, job, tmp_path / method, progress=False)
    finally:
        handle.remove()
    pipeline_calls = 2 if method == "rtn" else 2 + 2  # capture's 2 steps (+ PTQD's 2 steps)
    assert spy.calls > pipeline_calls  # the methods' own UNet calls were checked too


def test_sd_calibration_file_keeps_its_four_columns(_tiny_pipeline_template, tmp_path):
    from safetensors import safe_open

    data = capture_unet_inputs(_tiny_pipeline_template, PROMPTS, num_inference_steps=2,
                               guidance_scale=3.0, keep_steps=[1], progress=False)
    assert data.conditioning == {} and data.cross_attention_kwargs is None
    data.save(tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as file:
        assert sorted(file.keys()) == ["latents", "steps", "text", "timesteps"]


def _rows(batch: int = 4) -> UNetInputs:
    g = torch.Generator().manual_seed(0)
    return UNetInputs(
        torch.randn(batch, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(batch, 3, 8),
        added_cond_kwargs={"text_embeds": torch.randn(batch, 5, generator=g)},
        timestep_cond=torch.randn(1, 6, generator=g),  # batch 1: broadcast by the UNet
        class_labels=torch.arange(batch), cross_attention_kwargs={"scale": 0.5},
    ).rows()


def test_rows_select_cat_and_save_load_keep_every_field(tmp_path):
    rows = _rows()
    assert rows.timestep.shape == (4,) and rows.timestep.dtype == torch.float32
    assert rows.timestep_cond.shape == (4, 6) and rows.class_labels.dtype == torch.long
    both = UNetInputs.cat([rows.select(slice(0, 1)), rows.select(slice(1, 4))])
    assert all(torch.equal(a, b) for a, b in zip(both.named_tensors().values(),
                                                 rows.named_tensors().values()))
    data = CalibrationSet.from_inputs(rows, torch.tensor([0, 0, 1, 1]))
    data.save(tmp_path / "c.safetensors")
    loaded = CalibrationSet.load(tmp_path / "c.safetensors").subset(torch.tensor([1, 3]))
    back = loaded.inputs()
    assert back.cross_attention_kwargs == {"scale": 0.5}
    expected = rows.select(torch.tensor([1, 3])).named_tensors()
    assert back.named_tensors().keys() == expected.keys()
    assert all(torch.equal(back.named_tensors()[k], v) for k, v in expected.items())
    assert set(back.kwargs()) == {"encoder_hidden_states", "added_cond_kwargs", "timestep_cond",
                                  "class_labels", "cross_attention_kwargs"}


def test_a_version_1_calibration_file_still_loads(tmp_path):
    columns = {"latents": torch.zeros(2, 4, 8, 8), "timesteps": torch.ones(2),
               "text": torch.zeros(2, 3, 8), "steps": torch.zeros(2, dtype=torch.long)}
    save_file(columns, str(tmp_path / "v1.safetensors"),
              metadata={"format": "qlip-calibration", "version": "1"})
    data = CalibrationSet.load(tmp_path / "v1.safetensors")
    assert len(data) == 2 and data.conditioning == {} and data.cross_attention_kwargs is None


def test_bad_inputs_get_a_message(tmp_path):
    x, t, c = torch.zeros(2, 4, 8, 8), torch.tensor(1), torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="ControlNet"):
        UNetInputs.from_call((x, t, c), {"down_block_additional_residuals": (x,)})
    with pytest.raises(ValueError, match="does not know"):
        UNetInputs.from_call((x, t, c), {"guidance": t})
    with pytest.raises(ValueError, match="not tensors"):
        UNetInputs.from_call((x, t, c), {"added_cond_kwargs": {"image_embeds": [x]}})
    with pytest.raises(ValueError, match="first dim must be 2 or 1"):
        UNetInputs(x, t, c, timestep_cond=torch.zeros(3, 6)).rows()
    with pytest.raises(ValueError, match="unknown UNet conditioning key"):
        UNetInputs.from_conditioning(x, t, c, {"controlnet": x})
    with pytest.raises(ValueError, match="JSON"):
        CalibrationSet(x, t, c, t, cross_attention_kwargs={"x": x}).save(tmp_path / "c.st")
    save_file({"a": x}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a qlip calibration set"):
        CalibrationSet.load(tmp_path / "other.safetensors")
