"""Train the UNet and the text encoder jointly on VAE latents of renders made on the GPU.

Captions of random richness, 10% dropped to the empty string (for classifier-free guidance),
epsilon prediction with min-SNR-5 loss weights, AdamW, EMA of both networks. The loop stops by
itself at a wall-clock budget and resumes from ``OUT/state.pt`` (full state, stays on the
machine) or ``OUT/compact/`` (fp16 weights + EMA, small enough to carry between machines).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from qlip.world.domain import heldout_prompts, render_tensors
from qlip.world.model import (
    ReferenceModelConfig,
    build_pipeline,
    build_scheduler,
    build_text_encoder,
    build_unet,
)
from qlip.world.tokenizer import build_tokenizer
from qlip.world.train_common import (
    Clock,
    Every,
    build_prompt_pool,
    read_json,
    save_atomically,
    save_grid,
    write_json,
)
from qlip.world.train_eval import alignment_report


@dataclass
class UnetTrainConfig:
    out: Path
    vae_dir: Path
    seconds: float = 480.0
    max_steps: int = 1_000_000
    batch: int = 512
    lr: float = 4e-4
    warmup_steps: int = 500
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # Offset noise: a per-sample, per-channel constant of this std added to the noise, so the
    # model learns to set an image's mean colour (the background) from the text.
    offset_noise: float = 0.0
    # Richness level probabilities of the training captions (None: uniform).
    richness_weights: tuple[float, ...] | None = None
    ema_decay: float = 0.999
    seed: int = 0
    pool_size: int = 200_000
    checkpoint_seconds: float = 120.0
    eval_seconds: float = 180.0
    eval_prompts: int = 400
    compile: bool = True


class Trainee:
    """The trained networks, their EMA copies and the optimizer, saved and resumed together."""

    def __init__(self, config: UnetTrainConfig, tokenizer, device: torch.device):
        torch.manual_seed(config.seed)
        model_config = ReferenceModelConfig()
        self.unet = build_unet(model_config).to(device).train()
        self.text_encoder = build_text_encoder(model_config, tokenizer).to(device).train()
        self.ema_unet = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.ema_text_encoder = copy.deepcopy(self.text_encoder).eval().requires_grad_(False)
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.ema_params = (list(self.ema_unet.parameters())
                           + list(self.ema_text_encoder.parameters()))
        self.optimizer = torch.optim.AdamW(
            self.params, config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay,
            fused=device.type == "cuda",
        )
        self.step = 0

    def weights(self, ema: bool) -> dict[str, torch.Tensor]:
        unet, text = (self.ema_unet, self.ema_text_encoder) if ema else (self.unet,
                                                                         self.text_encoder)
        return {**{f"unet.{k}": v for k, v in unet.state_dict().items()},
                **{f"text_encoder.{k}": v for k, v in text.state_dict().items()}}

    def load_weights(self, weights: dict[str, torch.Tensor], ema: bool) -> None:
        unet, text = (self.ema_unet, self.ema_text_encoder) if ema else (self.unet,
                                                                         self.text_encoder)
        for prefix, module in (("unet.", unet), ("text_encoder.", text)):
            part = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            module.load_state_dict(part)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)

    def save(self, out: Path) -> None:
        """Full state (fp32, optimizer) plus a compact fp16 copy for carrying between machines."""
        state = {"model": self.weights(False), "ema": self.weights(True),
                 "optimizer": self.optimizer.state_dict(), "step": self.step}
        save_atomically(state, out / "state.pt")
        compact = out / "compact"
        compact.mkdir(parents=True, exist_ok=True)
        for name, ema in (("model", False), ("ema", True)):
            half = {k: v.detach().half().contiguous().cpu() for k, v in self.weights(ema).items()}
            save_file(half, compact / f"{name}_fp16.safetensors", metadata={"step": str(self.step)})
        write_json({"step": self.step}, compact / "step.json")

    def resume(self, out: Path) -> None:
        """Continue from the newest of the full state and the compact copy."""
        full_step = compact_step = -1
        if (out / "state.pt").is_file():
            state = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
            full_step = int(state["step"])
        compact_step = int(read_json(out / "compact" / "step.json").get("step", -1))
        if full_step >= 0 and full_step >= compact_step:
            self.load_weights(state["model"], ema=False)
            self.load_weights(state["ema"], ema=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = full_step
        elif compact_step >= 0:  # optimizer moments are not carried: a short re-warmup follows
            for name, ema in (("model", False), ("ema", True)):
                weights = load_file(out / "compact" / f"{name}_fp16.safetensors")
                self.load_weights({k: v.float() for k, v in weights.items()}, ema)
            self.step = compact_step
        print(f"resumed at step {self.step} (full state {full_step}, compact {compact_step})")


def denoising_loss(unet, text_encoder, input_ids, noisy, timesteps, noise, weights):
    """Min-SNR-weighted epsilon MSE. noisy, noise: [B, 4, h, w]; input_ids: [B, L]."""
    with torch.autocast(noisy.device.type, torch.bfloat16, enabled=noisy.is_cuda):
        context = text_encoder(input_ids)[0]  # context: [B, L, C]
        prediction = unet(noisy, timesteps, context).sample
    per_sample = (prediction.float() - noise).pow(2).mean((1, 2, 3))
    return (weights * per_sample).mean()


class LatentBatches:
    """Training batches made on the device: latents of the prompt pool, noise, caption dropout.

    The pool's scenes are rendered (with jitter) and encoded once per command, keeping the
    posterior mean and std: the loop then only samples, which keeps the GPU on the UNet.
    """

    def __init__(self, config: UnetTrainConfig, vae, pool, tokenizer, device, step: int):
        self.config, self.pool = config, pool
        self.generator = torch.Generator(device).manual_seed(config.seed * 1_000_003 + step)
        self.alphas_cumprod = build_scheduler().alphas_cumprod.to(device)
        empty = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids
        self.empty_ids = empty.to(device)  # empty_ids: [1, L]
        self.scaling_factor = vae.config.scaling_factor
        self.means, self.stds = self._encode_pool(vae)  # [N, 4, 16, 16] bf16 each

    @torch.no_grad()
    def _encode_pool(self, vae, chunk: int = 2048):
        means, stds = [], []
        for start in tqdm(range(0, len(self.pool), chunk), desc="encode pool", mininterval=10):
            scenes = {k: v[start:start + chunk] for k, v in self.pool.scenes.items()}
            with torch.autocast(self.empty_ids.device.type, torch.bfloat16,
                                enabled=self.empty_ids.is_cuda):
                images = render_tensors(scenes, generator=self.generator) * 2 - 1
                posterior = vae.encode(images).latent_dist
            means.append(posterior.mean.to(torch.bfloat16))
            stds.append(posterior.std.to(torch.bfloat16))
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def next(self) -> tuple[torch.Tensor, ...]:
        batch, generator = self.config.batch, self.generator
        device = self.empty_ids.device
        index = torch.randint(len(self.pool), (batch,), device=device, generator=generator)
        input_ids, mean, std = self.pool.input_ids[index], self.means[index], self.stds[index]
        sample = torch.randn(mean.shape, device=device, generator=generator)
        latents = (mean.float() + std.float() * sample) * self.scaling_factor  # [B, 4, 16, 16]
        timesteps = torch.randint(0, len(self.alphas_cumprod), (batch,), device=device,
                                  generator=generator)
        noise = torch.randn(latents.shape, device=device, generator=generator)
        if self.config.offset_noise > 0:
            offset = torch.randn(*latents.shape[:2], 1, 1, device=device, generator=generator)
            noise = noise + self.config.offset_noise * offset
        alpha = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        snr = (alpha / (1 - alpha)).flatten()
        weights = snr.clamp(max=self.config.min_snr_gamma) / snr
        dropped = torch.rand(batch, device=device, generator=generator)
        input_ids = torch.where((dropped < self.config.caption_dropout)[:, None],
                                self.empty_ids, input_ids)
        return input_ids, noisy, timesteps, noise, weights


@torch.no_grad()
def sample_images(pipe, texts: list[str], steps: int = 25, guidance: float = 4.0,
                  seed: int = 0, chunk: int = 500) -> np.ndarray:
    """Generate one image per text (DDIM ``steps``, CFG ``guidance``): uint8 [N, H, W, 3]."""
    images = []
    for start in range(0, len(texts), chunk):
        generator = torch.Generator(pipe.device).manual_seed(seed + start)
        result = pipe(texts[start:start + chunk], num_inference_steps=steps,
                      guidance_scale=guidance, generator=generator, output_type="np")
        images.append((result.images * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(images)


def evaluation_prompts(count: int):
    """A fixed mix of held-out prompts: ``count`` at random plus ``count // 2`` single-object."""
    prompts = heldout_prompts()
    order = np.random.default_rng(0).permutation(len(prompts))
    mixed = [prompts[i] for i in order[:count]]
    single = [prompts[i] for i in order if len(prompts[i].scene.objects) == 1][: count // 2]
    return mixed + single


def evaluate(trainee: Trainee, vae, tokenizer, prompts, out: Path, tag: str) -> dict:
    """Alignment of EMA samples (pixel checker), and a grid of the first 64 samples."""
    pipe = build_pipeline(ReferenceModelConfig(), tokenizer, vae, trainee.ema_text_encoder,
                          trainee.ema_unet)
    pipe.set_progress_bar_config(disable=True)
    images = sample_images(pipe, [p.text for p in prompts])
    save_grid(images[:64], out / f"samples_{tag}.png")
    report = {"step": trainee.step, **alignment_report(prompts, images)}
    print("eval", report)
    return report


def train_unet(config: UnetTrainConfig, device: torch.device, final_eval: bool = False) -> None:
    """Train (or resume) until the wall-clock budget; save, evaluate, write progress.json."""
    clock = Clock(config.seconds)
    torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer = build_tokenizer()
    vae = AutoencoderKL.from_pretrained(config.vae_dir).to(device).eval().requires_grad_(False)
    trainee = Trainee(config, tokenizer, device)
    trainee.resume(config.out)
    pool = build_prompt_pool(config.pool_size, config.seed + trainee.step, device, tokenizer,
                             config.richness_weights)
    batches = LatentBatches(config, vae, pool, tokenizer, device, trainee.step)
    loss_fn = torch.compile(denoising_loss) if config.compile else denoising_loss
    progress = read_json(config.out / "progress.json")
    history = progress.setdefault("evaluations", [])
    eval_prompts = evaluation_prompts(config.eval_prompts)
    checkpoint_due, eval_due = Every(config.checkpoint_seconds), Every(config.eval_seconds)
    first_step, bar = trainee.step, tqdm(desc="unet", initial=trainee.step, mininterval=10)
    while trainee.step < config.max_steps and not clock.expired():
        _train_step(config, trainee, loss_fn, batches.next(), trainee.step - first_step)
        bar.update(1)
        if trainee.step - first_step == 20:
            _report_step_time(config, trainee, loss_fn, batches)
        if checkpoint_due():
            trainee.save(config.out)
        if eval_due():
            history.append(evaluate(trainee, vae, tokenizer, eval_prompts, config.out, "last"))
    bar.close()
    steps_per_second = (trainee.step - first_step) / max(clock.elapsed(), 1e-9)
    trainee.save(config.out)
    history.append(evaluate(trainee, vae, tokenizer, eval_prompts, config.out, "last"))
    progress.update(steps=trainee.step, steps_per_second_last_run=steps_per_second,
                    batch=config.batch, lr=config.lr, offset_noise=config.offset_noise,
                    richness_weights=config.richness_weights)
    if final_eval:
        progress["final_heldout"] = evaluate(trainee, vae, tokenizer, heldout_prompts(),
                                             config.out, "heldout")
    write_json(progress, config.out / "progress.json")


def _report_step_time(config, trainee, loss_fn, batches, repeats: int = 20) -> None:
    """Print the time of making a batch and of one optimisation step (after compilation)."""
    if not torch.cuda.is_available():
        return
    torch.cuda.synchronize()
    start = time.perf_counter()
    data = [batches.next() for _ in range(repeats)]
    torch.cuda.synchronize()
    made = time.perf_counter()
    for batch in data:
        _train_step(config, trainee, loss_fn, batch, trainee.step)
    torch.cuda.synchronize()
    done = time.perf_counter()
    print(f"batch {1e3 * (made - start) / repeats:.1f} ms, "
          f"step {1e3 * (done - made) / repeats:.1f} ms", flush=True)


def _train_step(config: UnetTrainConfig, trainee: Trainee, loss_fn, batch, steps_this_run):
    # Warm up at every start: after a resume from the compact copy the moments start at zero.
    lr = config.lr * min(1.0, (steps_this_run + 1) / config.warmup_steps)
    for group in trainee.optimizer.param_groups:
        group["lr"] = lr
    loss = loss_fn(trainee.unet, trainee.text_encoder, *batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainee.params, 1.0)
    trainee.optimizer.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    trainee.step += 1
    trainee.update_ema(min(config.ema_decay, (1 + trainee.step) / (10 + trainee.step)))
    if trainee.step % 500 == 0:
        print(f"step {trainee.step} loss {loss.item():.4f} lr {lr:.2e}", flush=True)


def export_reference_model(vae_dir: Path, weights_file: Path, out_dir: Path) -> None:
    """Write the shippable fp16 diffusers folder from a VAE folder and (EMA) fp16 weights."""
    from qlip.world.tokenizer import write_tokenizer_files

    tokenizer = build_tokenizer()
    config = ReferenceModelConfig()
    vae = AutoencoderKL.from_pretrained(vae_dir)
    unet, text_encoder = build_unet(config), build_text_encoder(config, tokenizer)
    weights = {k: v.float() for k, v in load_file(weights_file).items()}
    for prefix, module in (("unet.", unet), ("text_encoder.", text_encoder)):
        module.load_state_dict({k[len(prefix):]: v for k, v in weights.items()
                                if k.startswith(prefix)})
    pipe = build_pipeline(config, tokenizer, vae, text_encoder, unet).to(torch.float16)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    write_tokenizer_files(Path(out_dir) / "tokenizer")  # CLIP's own file formats, too
