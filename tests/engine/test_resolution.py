"""``--height/--width`` reach every pipeline call: calibration capture, generation and eval."""

import json

import pytest
from PIL import Image
from safetensors import safe_open

from qlip.cli import main


def test_quantize_and_generate_honour_height_and_width(tiny_pipe_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    size = ["--height", "32", "--width", "24"]
    assert main(["quantize", "--model", str(tiny_pipe_dir), "--device", "cpu", "--calib-prompts",
                 str(prompts), "--calib-num", "2", "--calib-steps", "2", "--calib-kept-steps", "2",
                 *size, "--out", str(tmp_path / "q")]) == 0
    with safe_open(tmp_path / "q" / "calibration.safetensors", "pt") as f:
        assert tuple(f.get_slice("latents").get_shape()[2:]) == (16, 12)  # VAE factor 2
    assert main(["generate", "a red circle", "--model", str(tiny_pipe_dir), "--device", "cpu",
                 "--quantized", str(tmp_path / "q"), "--steps", "2", *size,
                 "--out", str(tmp_path / "g")]) == 0
    assert Image.open(tmp_path / "g" / "0000.png").size == (24, 32)
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    assert report["images"][0]["steps"] == 2


def test_pndm_report_counts_sampling_steps_not_unet_calls(tiny_pipe_dir, tmp_path):
    from qlip.pipeline import GenerationConfig, generate, load_pipeline

    pipe = load_pipeline(str(tiny_pipe_dir))
    from diffusers import PNDMScheduler

    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)  # SD 1.x
    result = generate(pipe, ["a red circle"], [0], None, GenerationConfig(steps=5, guidance=1.0),
                      progress=False)
    assert (result.reports[0].steps, result.reports[0].unet_calls) == (5, 6)


@pytest.mark.parametrize("value", ["30", "0", "x"])
def test_a_resolution_that_is_not_a_multiple_of_8_is_refused(value, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "a", "--height", value, "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "--height" in capsys.readouterr().err


def test_a_lone_height_or_width_keeps_the_other_at_the_pipelines_own(tiny_pipe):
    """diffusers' SD pipeline given one of the two drops it and uses its own size for both; qlip
    fills in the missing one from the pipeline's own resolution, so a lone --height reaches the
    images (calibration capture and PTQD's statistics take the same sizes)."""
    from qlip.pipeline import GenerationConfig, generate
    from qlip.pipeline.resolution import pipeline_resolution

    own = tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor  # 16 px here
    assert pipeline_resolution(tiny_pipe, 32, None) == (32, own)
    assert pipeline_resolution(tiny_pipe, None, 24) == (own, 24)
    assert pipeline_resolution(tiny_pipe, None, None) == (None, None)
    result = generate(tiny_pipe, ["a red circle"], [0], None,
                      GenerationConfig(steps=1, guidance=1.0, height=32), progress=False)
    assert result.images[0].size == (own, 32)
