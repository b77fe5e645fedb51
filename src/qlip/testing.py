"""Tiny random diffusers pipelines built from configs, for tests and smoke runs; nothing is
downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _byte_chars() -> list[str]:
    # the printable-byte alphabet of CLIP's byte-level BPE
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def build_tokenizer(folder, max_length: int = 32):
    """A CLIPTokenizer over single bytes (no merges): any text tokenizes, one token per character."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length
    )


def build_tiny_pipeline(tmp_dir: Path):
    """A StableDiffusionPipeline with a ~0.8 M-parameter UNet (8×8 latents), seeded."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    tokenizer = build_tokenizer(tmp_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1,
    ))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The Stable Diffusion 1.4 UNet (CompVis/stable-diffusion-v1-4, unet/config.json), for benchmarks
# with random weights: 859.5 M parameters.
SD14_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=32, act_fn="silu", center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)


# The SDXL base 1.0 UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): 2,567.5 M
# parameters; 128x128 latents, context 2048 (both text towers), added conditioning of the pooled
# text embedding [1280] and six time ids (6 x 256 + 1280 = 2816).
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)
UNET_CONFIGS = {"sd14": SD14_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}


def build_unet(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0):
    """A published UNet architecture (``"sd14"`` or ``"sdxl"``, :data:`UNET_CONFIGS`) with seeded
    random weights (drawn on ``device``: another device draws other weights), in eval mode,
    frozen: what a real checkpoint costs in time and memory."""
    from diffusers import UNet2DConditionModel

    if arch not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet architecture {arch!r}: choose one of {sorted(UNET_CONFIGS)}")
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: no host copy of SDXL's 10 GB in fp32
        unet = UNet2DConditionModel(**UNET_CONFIGS[arch])
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def unet_step_inputs(unet, batch: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Random inputs of one denoising step at the UNet's own latent size: ``(x, t, context,
    kwargs)``, ``kwargs`` holding SDXL's ``added_cond_kwargs`` where the UNet takes them (the
    pooled text embedding's width is what the projection leaves after the six time ids)."""
    config = unet.config
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same inputs on every device

    def draw(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    size = config.sample_size
    x = draw(batch, config.in_channels, size, size)
    c = draw(batch, 77, config.cross_attention_dim)
    t = torch.full((batch,), 500, device=device)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        time_ids = 6
        pooled = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
        ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch)
        kwargs["added_cond_kwargs"] = {"text_embeds": draw(batch, pooled),
                                       "time_ids": ids.to(device, dtype)}
    return x, t, c, kwargs


def step_at_bits(forward, units, bits, x, t, context) -> torch.Tensor:
    """One step of ``forward`` (a UNet or its compiled forward) with every unit of ``units`` (a
    name -> unit mapping) at ``bits``, without gradients: the output's ``sample``."""
    for unit in units.values():
        unit.set_bits(bits)
    with torch.no_grad():
        return forward(x, t, encoder_hidden_states=context).sample


def build_sd14_unet(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The SD 1.4 UNet architecture with seeded random weights, in eval mode, frozen."""
    return build_unet("sd14", device, dtype, seed)


# Stable Diffusion 1.4's VAE (vae/config.json) and text encoder (CLIP ViT-L/14's text tower)
SD14_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD14_TEXT_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                        num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")


def build_sd14_pipeline(tmp_dir: Path, seed: int = 0):
    """A StableDiffusionPipeline of Stable Diffusion 1.4's sizes (UNet 859.5 M, VAE 83.7 M, CLIP
    ViT-L text tower 123 M parameters; PNDM as SD 1.4 ships) with seeded random weights and the
    local byte tokenizer at 77 tokens: what a new user's real checkpoint costs in time and
    memory, without a download. Save it with ``save_pretrained`` to try the commands on it."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(tmp_dir, max_length=77)
    unet = build_sd14_unet(seed=seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**SD14_VAE_CONFIG).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=1, **SD14_TEXT_CONFIG)).eval()
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl_pipeline(tmp_dir: Path):
    """A StableDiffusionXLPipeline with an SDXL-like tiny UNet (``addition_embed_type="text_time"``:
    it needs ``added_cond_kwargs`` with ``text_embeds`` and ``time_ids``), two text towers, 8×8
    latents; seeded. (Component sizes as in diffusers' own SDXL tests.)"""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    base = build_tiny_pipeline(tmp_dir)  # its VAE, tokenizer and scheduler
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + pooled text [32]
        cross_attention_dim=64, norm_num_groups=8,  # both towers' hidden states, 32 + 32
    )
    tokenizer = base.tokenizer
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=1,
        hidden_act="gelu",
    )
    pipe = StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=CLIPTextModel(config), text_encoder_2=(
            CLIPTextModelWithProjection(config)), tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=base.scheduler, force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TinyInception(torch.nn.Module):
    """A tiny random network of Inception-v3's shape for ``InceptionExtractor(network=...)``:
    uint8 images ``[N, 3, H, W]`` in, pooled features ``[N, dim]`` out, and a submodule at
    ``Mixed_6d.branch1x1`` whose output is the sFID map (torch-fidelity's port: ``[N, 192, 17,
    17]``; here ``[N, 8, 3, 3]``, so that sFID's first 7 channels give 63 features and its matrix
    square root takes milliseconds). Seeded; nothing is downloaded."""

    def __init__(self, dim: int = 16, seed: int = 0):
        from torch import nn

        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 8, 3, stride=2)  # 7² -> 3²
        self.Mixed_6d = nn.Module()
        self.Mixed_6d.branch1x1 = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, dim, 3, padding=1)
        torch.random.set_rng_state(generator_state)  # building it leaves the caller's seed alone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        x = images.float() / 127.5 - 1  # uint8 -> [-1, 1], as torch-fidelity scales
        x = F.interpolate(x, size=(7, 7), mode="bilinear", align_corners=False)
        spatial = self.Mixed_6d.branch1x1(F.relu(self.stem(x)))  # [N, 8, 3, 3]
        return self.head(F.relu(spatial)).mean((2, 3))  # [N, dim]
