"""The reference world's latent text-to-image model, in the exact Stable Diffusion 1.x format.

AutoencoderKL (64x64x3 <-> 16x16x4), CLIPTextModel, UNet2DConditionModel with cross-attention in
its down, mid and up blocks, epsilon prediction, DDIM as the folder's scheduler. The sizes were
chosen so that the fp16 folder stays under 20 MB.

Example:
    >>> pipe = build_pipeline()  # random weights
    >>> pipe.save_pretrained("folder"); StableDiffusionPipeline.from_pretrained("folder")
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from qlip.world.tokenizer import MODEL_MAX_LENGTH, build_tokenizer

IMAGE_SIZE = 64
LATENT_CHANNELS = 4


@dataclass
class ReferenceModelConfig:
    """Sizes of the three networks; the defaults are the shipped model."""

    vae_channels: tuple[int, ...] = (32, 64, 64)  # two downsamplings: 64 -> 16
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 6
    unet_channels: tuple[int, ...] = (64, 128, 128)  # latents at 16x16, 8x8, 4x4
    # Which resolution levels get transformer blocks (as in SD 1.x, not the lowest one);
    # the mid block always has one.
    unet_attention: tuple[bool, ...] = (True, True, False)
    unet_layers_per_block: int = 1
    # Heads per block (diffusers calls this "attention_head_dim" for SD 1.x UNets); 32 per head.
    unet_heads: tuple[int, ...] = field(default=(2, 4, 4))
    max_length: int = MODEL_MAX_LENGTH


def tiny_config() -> ReferenceModelConfig:
    """A very small variant for fast tests."""
    return ReferenceModelConfig(
        vae_channels=(8, 16, 16), text_hidden=32, text_layers=1, text_heads=2,
        unet_channels=(16, 32, 32), unet_heads=(1, 2, 2), max_length=24,
    )


def build_vae(config: ReferenceModelConfig) -> AutoencoderKL:
    blocks = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=min(32, config.vae_channels[0]),
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # replaced by 1/std of the trained latents (see train_vae)
    )


def build_text_encoder(config: ReferenceModelConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=4 * config.text_hidden,
        projection_dim=config.text_hidden,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_length,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(text_config)


def build_unet(config: ReferenceModelConfig) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.unet_attention))
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2 ** (len(config.vae_channels) - 1),
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=down,
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=up,
        block_out_channels=config.unet_channels,
        layers_per_block=config.unet_layers_per_block,
        cross_attention_dim=config.text_hidden,
        attention_head_dim=config.unet_heads,
        norm_num_groups=min(32, config.unet_channels[0]),
    )


def build_scheduler() -> DDIMScheduler:
    """Cosine schedule: at 16x16 latents the linear schedules leave little signal far too early."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_pipeline(
    config: ReferenceModelConfig | None = None,
    tokenizer: CLIPTokenizer | None = None,
    vae: AutoencoderKL | None = None,
    text_encoder: CLIPTextModel | None = None,
    unet: UNet2DConditionModel | None = None,
) -> StableDiffusionPipeline:
    """Assemble a StableDiffusionPipeline; parts not given are built with random weights."""
    config = config or ReferenceModelConfig()
    tokenizer = tokenizer or build_tokenizer(config.max_length)
    return StableDiffusionPipeline(
        vae=vae or build_vae(config),
        text_encoder=text_encoder or build_text_encoder(config, tokenizer),
        tokenizer=tokenizer,
        unet=unet or build_unet(config),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
