"""The reference model: tokenizer, configs, save/load in diffusers format, the committed folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

from qlip.world.model import build_pipeline, count_parameters, tiny_config
from qlip.world.reference import REFERENCE_MODEL_DIR, load_reference_pipeline
from qlip.world.tokenizer import MODEL_MAX_LENGTH, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_domain_words_are_single_tokens_and_round_trip(tokenizer):
    ids = tokenizer("a large red circle in the top left on a beige background").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 2 + 12  # one token per word
    text = "An odd Zebra-word, 42!"
    decoded = tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")


def test_tokenizer_max_length_pads_and_truncates(tokenizer):
    assert tokenizer.model_max_length == MODEL_MAX_LENGTH == 48
    batch = tokenizer(["a circle", "word " * 100], padding="max_length", truncation=True,
                      max_length=tokenizer.model_max_length)
    assert [len(ids) for ids in batch.input_ids] == [48, 48]


def test_tiny_pipeline_saves_reloads_and_samples(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    pipe = build_pipeline(config, build_tokenizer(config.max_length))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    for name in ("unet", "vae", "text_encoder"):
        before, after = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert loaded.unet.config.sample_size == 16 and loaded.unet.config.in_channels == 4
    assert loaded.scheduler.config.prediction_type == "epsilon"
    images = loaded("a red circle", num_inference_steps=2, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    # The usual schedulers take the folder's scheduler config.
    loaded.scheduler = PNDMScheduler.from_config(loaded.scheduler.config, skip_prk_steps=True)
    again = loaded("a red circle", num_inference_steps=2, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(0), output_type="np").images
    assert again.shape == (1, 64, 64, 3) and np.isfinite(again).all()


def test_default_architecture_fits_the_size_budget():
    pipe = build_pipeline()
    total = sum(count_parameters(getattr(pipe, n)) for n in ("unet", "vae", "text_encoder"))
    assert total * 2 < 20e6  # fp16 bytes
    blocks = pipe.unet.config
    assert "CrossAttnDownBlock2D" in blocks.down_block_types
    assert "CrossAttnUpBlock2D" in blocks.up_block_types
    assert blocks.mid_block_type == "UNetMidBlock2DCrossAttn" and not blocks.only_cross_attention
    assert isinstance(pipe.scheduler, DDIMScheduler)


def test_missing_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m qlip.world.train"):
        load_reference_pipeline(model_dir=tmp_path / "nothing")


@pytest.mark.skipif(not (REFERENCE_MODEL_DIR / "model_index.json").is_file(),
                    reason="reference model not exported yet")
def test_committed_reference_model_loads_and_draws():
    size = sum(f.stat().st_size for f in REFERENCE_MODEL_DIR.rglob("*") if f.is_file())
    assert size < 20e6
    pipe = load_reference_pipeline()
    assert pipe.unet.dtype == torch.float32
    image = pipe("a red square", num_inference_steps=4, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert image.std() > 0.02  # not a flat image
