"""The published UNet architectures the benchmarks build with random weights (qlip.testing):
their parameter counts are the released checkpoints' (counted on the meta device: no memory),
and their step inputs fit them."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from qlip.testing import UNET_CONFIGS, build_tiny_sdxl_pipeline, build_unet, unet_step_inputs

# parameters of CompVis/stable-diffusion-v1-4's and stable-diffusion-xl-base-1.0's unet/
RELEASED = {"sd14": 859_520_964, "sdxl": 2_567_463_684}


@pytest.mark.parametrize("arch", sorted(RELEASED))
def test_configs_have_the_released_parameter_counts(arch):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS[arch])
    assert sum(p.numel() for p in unet.parameters()) == RELEASED[arch]


def test_step_inputs_fit_an_sdxl_unet_and_an_sd_unet(tmp_path):
    sdxl = build_tiny_sdxl_pipeline(tmp_path).unet
    x, t, c, kwargs = unet_step_inputs(sdxl, 2, seed=3)
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    with torch.no_grad():
        out = sdxl(x, t, encoder_hidden_states=c, **kwargs).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    again = unet_step_inputs(sdxl, 2, seed=3)
    assert torch.equal(again[0], x) and torch.equal(again[2], c)  # seeded
    with torch.device("meta"):
        sd = UNet2DConditionModel(**UNET_CONFIGS["sd14"])
    x, t, c, kwargs = unet_step_inputs(sd, 1, device="meta")
    assert kwargs == {} and x.shape == (1, 4, 64, 64) and c.shape == (1, 77, 768)


def test_unknown_architecture_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="sd14.*sdxl"):
        build_unet("sd3")
