"""Train the reference world's AutoencoderKL on renders made on the fly (on the GPU).

Loss: mean squared error + L1 of the reconstruction (from a posterior sample, so the decoder
learns to tolerate latent noise) + a small KL term. At the end the latent scaling factor is set to
1/std of the latents, as Stable Diffusion does, and the VAE is saved in diffusers format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm import tqdm

from qlip.world.domain import heldout_prompts, render_tensors, scene_tensors
from qlip.world.model import ReferenceModelConfig, build_vae
from qlip.world.train_common import (
    Clock,
    Every,
    build_prompt_pool,
    read_json,
    save_atomically,
    save_grid,
    to_uint8,
    write_json,
)
from qlip.world.train_eval import alignment_report


@dataclass
class VaeTrainConfig:
    out: Path
    seconds: float = 150.0
    max_steps: int = 100_000
    batch: int = 256
    lr: float = 1e-3
    kl_weight: float = 1e-4  # per latent element, against per-pixel reconstruction losses
    l1_weight: float = 0.5
    seed: int = 0
    checkpoint_seconds: float = 120.0
    compile: bool = True
    pool_size: int = 50_000


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float, l1_weight: float):
    """images: [B, 3, H, W] in [-1, 1]. Returns (loss, reconstruction mse)."""
    with torch.autocast(images.device.type, torch.bfloat16, enabled=images.is_cuda):
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample.float()
    mse = F.mse_loss(reconstruction, images)
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    loss = mse + l1_weight * F.l1_loss(reconstruction, images) + kl_weight * kl
    return loss, mse


def _resume(config: VaeTrainConfig, vae, optimizer) -> int:
    state_path = config.out / "state.pt"
    if not state_path.is_file():
        return 0
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    vae.load_state_dict(state["vae"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def train_vae(config: VaeTrainConfig, device: torch.device) -> AutoencoderKL:
    """Train (or resume) until ``config.seconds`` or ``config.max_steps``; save and report."""
    clock = Clock(config.seconds)
    torch.manual_seed(config.seed)
    vae = build_vae(ReferenceModelConfig()).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), config.lr, weight_decay=0.0,
                                  fused=device.type == "cuda")
    step = _resume(config, vae, optimizer)
    pool = build_prompt_pool(config.pool_size, config.seed, device)  # scenes only
    generator = torch.Generator(device).manual_seed(config.seed * 1_000_003 + step)
    loss_fn = torch.compile(vae_loss) if config.compile else vae_loss
    render = torch.compile(render_tensors) if config.compile else render_tensors
    checkpoint_due = Every(config.checkpoint_seconds)
    bar = tqdm(total=config.max_steps, initial=step, desc="vae", mininterval=10)
    while step < config.max_steps and not clock.expired():
        _, scenes = pool.sample(config.batch, generator)
        images = render(scenes, generator=generator) * 2 - 1
        loss, mse = loss_fn(vae, images, config.kl_weight, config.l1_weight)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % 200 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{-10 * np.log10(mse.item() / 4):.1f}")
        if checkpoint_due():
            _save(config, vae, optimizer, step)
    bar.close()
    _save(config, vae, optimizer, step)
    return finish_vae(config, vae.eval(), device, step)


def _save(config, vae, optimizer, step) -> None:
    state = {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    save_atomically(state, config.out / "state.pt")


@torch.no_grad()
def finish_vae(config: VaeTrainConfig, vae, device, step: int) -> AutoencoderKL:
    """Set the latent scaling factor, save in diffusers format, report reconstruction quality."""
    prompts = heldout_prompts()[::6]  # 500 prompts over all levels and object counts
    scenes = {k: v.to(device) for k, v in scene_tensors([p.scene for p in prompts]).items()}
    real = render_tensors(scenes, generator=torch.Generator(device).manual_seed(1))
    latents = vae.encode(real * 2 - 1).latent_dist.sample()
    scaling_factor = 1.0 / float(latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    reconstruction = (vae.decode(latents).sample + 1) / 2
    mse = float(F.mse_loss(reconstruction.clamp(0, 1), real))
    report = {
        "step": step,
        "scaling_factor": scaling_factor,
        "psnr_db": -10 * float(np.log10(mse)),
        "latent_mean": float(latents.mean()),
        "checker_on_reconstructions": alignment_report(prompts, to_uint8(reconstruction)),
        "checker_on_renders": alignment_report(prompts, to_uint8(real)),
    }
    vae.save_pretrained(config.out / "vae")
    write_json({**read_json(config.out / "progress.json"), **report}, config.out / "progress.json")
    pairs = torch.stack([real[:32], reconstruction[:32].clamp(0, 1)], 1).flatten(0, 1)
    save_grid(to_uint8(pairs), config.out / "reconstructions.png")
    print(report)
    return vae
