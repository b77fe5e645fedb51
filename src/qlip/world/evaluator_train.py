"""Train the reference world's evaluator on rendered scenes only (never on generated images).

    python -m qlip.world.evaluator_train --out runs/eval/train --minutes 5

Data: a pool of scenes from `domain.sample_scene` (held-out combinations included: the evaluator
must recognise them), rendered with the domain's position/size jitter, two captions each at
random richness. Every batch is augmented on the GPU (shift/scale, blur, low-frequency colour
blotches, noise, colour gain/offset) so that the evaluator does not only recognise pixel-perfect
renders. Losses: per-slot presence (BCE), shape/colour/size (CE, occupied slots), background
(CE), and a CLIP-style InfoNCE between the towers whose positives are every caption that is
*true* of the image (so "a circle" is a positive for every image with a circle).
The learning rate follows a cosine over `max(step / steps, time / budget)`, so a run stopped by
its wall-clock budget still anneals; it checkpoints every minute and resumes from `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers.pre_tokenizers import Whitespace
from tqdm import tqdm

from qlip.metrics.alignment import alignment
from qlip.world import domain
from qlip.world.evaluator import (
    PAD_TOKEN,
    UNK_TOKEN,
    EvaluatorConfig,
    ReferenceEvaluator,
    save_evaluator,
)

CHECKPOINT_FILE = "checkpoint.pt"
ATTRIBUTES = ("shape", "color", "size")
CAPTIONS_PER_SCENE = 2


# --- vocabulary and labels --------------------------------------------------------------------


def build_vocabulary(seed: int, samples: int = 20_000) -> list[str]:
    """Every word the domain's captions use (sorted), after PAD and UNK."""
    rng = np.random.default_rng(seed)
    words = {
        w
        for name in (
            *domain.SHAPES,
            *domain.COLORS,
            *domain.SIZES,
            *domain.POSITIONS,
            *domain.BACKGROUNDS,
        )
        for w in name.split()
    }
    splitter = Whitespace()
    for _ in range(samples):
        prompt = domain.describe(
            domain.sample_scene(rng), int(rng.choice(domain.RICHNESS_LEVELS)), rng
        )
        words.update(word for word, _ in splitter.pre_tokenize_str(prompt.text.lower()))
    return [PAD_TOKEN, UNK_TOKEN, *sorted(words)]


def default_config(vocabulary: list[str]) -> EvaluatorConfig:
    return EvaluatorConfig(
        shapes=list(domain.SHAPES),
        colors=list(domain.COLORS),
        sizes=list(domain.SIZES),
        positions=list(domain.POSITIONS),
        backgrounds=list(domain.BACKGROUNDS),
        vocabulary=vocabulary,
    )


def slot_labels(scenes: list[domain.Scene]) -> dict[str, torch.Tensor]:
    """Per-slot targets: present [N, P] bool, shape/color/size [N, P] (-100 where empty), background [N]."""
    objects = domain.scene_tensors(scenes)  # object-indexed [N, K]
    count, slots = len(scenes), len(domain.POSITIONS)
    labels = {"present": torch.zeros(count, slots, dtype=torch.bool)}
    rows = torch.arange(count)[:, None].expand_as(objects["present"])[objects["present"]]
    where = objects["position"][objects["present"]]
    labels["present"][rows, where] = True
    for name in ATTRIBUTES:
        labels[name] = torch.full((count, slots), -100, dtype=torch.long)
        labels[name][rows, where] = objects[name][objects["present"]]
    labels["background"] = objects["background"]
    return labels


def mention_ids(prompt: domain.Prompt) -> tuple[torch.Tensor, int]:
    """A caption's mentions as ids [MAX_OBJECTS, 4] (shape, color, size, position; -1 = unstated)
    and its background id (-1 = unstated)."""
    names = (domain.SHAPES, tuple(domain.COLORS), domain.SIZES, domain.POSITIONS)
    ids = torch.full((domain.MAX_OBJECTS, 4), -1, dtype=torch.long)
    for m, mention in enumerate(prompt.mentions):
        for a, value in enumerate((mention.shape, mention.color, mention.size, mention.position)):
            if value is not None:
                ids[m, a] = names[a].index(value)
    background = (
        -1 if prompt.background is None else tuple(domain.BACKGROUNDS).index(prompt.background)
    )
    return ids, background


def captions_true_of(
    labels: dict[str, torch.Tensor], mentions: torch.Tensor, caption_background: torch.Tensor
) -> torch.Tensor:
    """consistent[i, j]: caption j is true of scene i (every mention matches some object of i
    on all stated attributes, and the stated background matches). mentions: [B, M, 4]."""
    present = labels["present"]  # [B, P]
    slots = torch.arange(present.shape[1], device=present.device).expand_as(present)
    scene = torch.stack([labels["shape"], labels["color"], labels["size"], slots], -1)  # [B, P, 4]
    stated = mentions[None, :, :, None, :]  # [1, Bj, M, 1, 4]
    equal = (stated == scene[:, None, None]) | (stated < 0)  # [Bi, Bj, M, P, 4]
    found = (equal.all(-1) & present[:, None, None]).any(-1)  # [Bi, Bj, M]
    unused = (mentions < 0).all(-1)[None]  # [1, Bj, M]
    background_ok = (caption_background[None] < 0) | (
        caption_background[None] == labels["background"][:, None]
    )
    return (found | unused).all(-1) & background_ok


# --- data pool and augmentation ---------------------------------------------------------------


@dataclass
class Pool:
    """Rendered scenes and their captions, on the training device."""

    images: torch.Tensor  # [N, 3, H, W] uint8
    labels: dict[str, torch.Tensor]  # slot_labels, [N, ...]
    tokens: torch.Tensor  # [N, CAPTIONS_PER_SCENE, L]
    mentions: torch.Tensor  # [N, CAPTIONS_PER_SCENE, M, 4]
    caption_background: torch.Tensor  # [N, CAPTIONS_PER_SCENE]


def build_pool(
    size: int, seed: int, model: ReferenceEvaluator, device: torch.device, chunk: int = 2048
) -> Pool:
    """Sample, caption and render `size` scenes deterministically from `seed`."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device).manual_seed(seed)
    images, tokens, mentions, backgrounds, scenes = [], [], [], [], []
    for start in tqdm(range(0, size, chunk), desc="rendering pool", leave=False):
        batch = [domain.sample_scene(rng) for _ in range(min(chunk, size - start))]
        prompts = [
            domain.describe(scene, int(rng.choice(domain.RICHNESS_LEVELS)), rng)
            for scene in batch
            for _ in range(CAPTIONS_PER_SCENE)
        ]
        rendered = domain.render_batch(batch, model.config.image_size, device, generator)
        images.append((rendered * 255).round().to(torch.uint8))
        tokens.append(
            model.tokenize([p.text for p in prompts]).view(len(batch), CAPTIONS_PER_SCENE, -1)
        )
        ids = [mention_ids(p) for p in prompts]
        mentions.append(
            torch.stack([i for i, _ in ids]).view(len(batch), CAPTIONS_PER_SCENE, -1, 4)
        )
        backgrounds.append(torch.tensor([b for _, b in ids]).view(len(batch), CAPTIONS_PER_SCENE))
        scenes += batch
    labels = {k: v.to(device) for k, v in slot_labels(scenes).items()}
    return Pool(
        torch.cat(images),
        labels,
        torch.cat(tokens).to(device),
        torch.cat(mentions).to(device),
        torch.cat(backgrounds).to(device),
    )


def _uniform(
    shape: tuple[int, ...], low: float, high: float, generator: torch.Generator
) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, device=generator.device, generator=generator)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2.5 * sigma))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).expand(3, 1, 1, -1)
    blurred = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), kernel, groups=3)
    return F.conv2d(
        F.pad(blurred, (0, 0, radius, radius), mode="replicate"), kernel.transpose(-1, -2), groups=3
    )


def augment(
    images: torch.Tensor, generator: torch.Generator, clean_fraction: float = 0.2
) -> torch.Tensor:
    """Perturb images [B, 3, H, W] in [0, 1] the way a generator's output differs from a render."""
    batch = len(images)
    # Small shift and scale (positions are coarse slots, so a few pixels never change the answer).
    scale = _uniform((batch,), 0.94, 1.06, generator)
    theta = torch.zeros(batch, 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = _uniform((batch, 2), -0.06, 0.06, generator)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Blur of random strength: mix with a strongly blurred copy.
    out = torch.lerp(out, _gaussian_blur(out, 1.2), _uniform((batch, 1, 1, 1), 0, 1, generator))
    # Low-frequency colour blotches, colour gain/offset, pixel noise.
    blotches = torch.randn(batch, 3, 4, 4, device=images.device, generator=generator)
    blotches = F.interpolate(blotches, images.shape[-2:], mode="bicubic", align_corners=False)
    out = out + blotches * _uniform((batch, 1, 1, 1), 0, 0.04, generator)
    out = out * _uniform((batch, 3, 1, 1), 0.92, 1.08, generator)
    out = out + _uniform((batch, 3, 1, 1), -0.04, 0.04, generator)
    noise = torch.randn(out.shape, device=images.device, generator=generator)
    out = (out + noise * _uniform((batch, 1, 1, 1), 0, 0.06, generator)).clamp(0, 1)
    keep = torch.rand(batch, 1, 1, 1, device=images.device, generator=generator) < clean_fraction
    return torch.where(keep, images, out)


# --- training ---------------------------------------------------------------------------------


def training_losses(
    model: ReferenceEvaluator,
    images: torch.Tensor,
    labels: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    positives: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Scene-reading losses plus the contrastive loss over `positives` [B, B] (image i, caption j)."""
    out = model.image_tower(images)
    losses = {
        "presence": F.binary_cross_entropy_with_logits(out.presence, labels["present"].float()),
        "background": F.cross_entropy(out.background, labels["background"]),
    }
    for name in ATTRIBUTES:
        logits = getattr(out, name)
        losses[name] = F.cross_entropy(
            logits.flatten(0, 1), labels[name].flatten(), ignore_index=-100
        )
    image_embeddings = model.embed_images(out.hidden.float())
    text_embeddings = model.embed_texts(tokens)
    logits = model.logit_scale.exp().clamp(max=100) * image_embeddings @ text_embeddings.T
    targets = positives.float()
    image_to_text = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(targets / targets.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    losses["contrastive"] = (image_to_text + text_to_image) / 2
    return losses


def sample_batch(pool: Pool, batch_size: int, generator: torch.Generator):
    """Random scenes, one of their captions each, augmented images, and caption truth [B, B]."""
    index = torch.randint(
        len(pool.images), (batch_size,), device=generator.device, generator=generator
    )
    which = torch.randint(
        CAPTIONS_PER_SCENE, (batch_size,), device=generator.device, generator=generator
    )
    labels = {k: v[index] for k, v in pool.labels.items()}
    images = augment(pool.images[index].float() / 255, generator)
    positives = captions_true_of(
        labels, pool.mentions[index, which], pool.caption_background[index, which]
    )
    return images, labels, pool.tokens[index, which], positives


def learning_rate(base: float, progress: float, warmup: float = 0.03) -> float:
    if progress < warmup:
        return base * progress / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def optimisation_step(
    model: ReferenceEvaluator, optimizer: torch.optim.Optimizer, batch: tuple, lr: float
) -> dict[str, torch.Tensor]:
    """One AdamW step at learning rate `lr` on a `sample_batch` batch (bf16 autocast on GPU)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    device_type = model.device.type
    with torch.autocast(device_type, torch.bfloat16, enabled=device_type == "cuda"):
        losses = training_losses(model, *batch)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()
    return losses


def train(args: argparse.Namespace) -> ReferenceEvaluator:
    """Train until `args.steps` or `args.minutes` of training time; resumable from args.out."""
    device, out = torch.device(args.device), Path(args.out)
    torch.manual_seed(args.seed)
    model = ReferenceEvaluator(default_config(build_vocabulary(args.seed))).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    step, elapsed = load_checkpoint(out, model, optimizer)
    pool = build_pool(args.pool, args.seed, model, device)
    generator = torch.Generator(device).manual_seed(args.seed + step)
    budget, last_save = args.minutes * 60, time.monotonic()
    progress_bar = tqdm(total=args.steps, initial=step, desc="training evaluator")
    model.train()
    while (progress := max(step / args.steps, elapsed / budget)) < 1:
        started = time.monotonic()
        batch = sample_batch(pool, args.batch, generator)
        losses = optimisation_step(model, optimizer, batch, learning_rate(args.lr, progress))
        step += 1
        progress_bar.update()
        if step % 100 == 0:
            progress_bar.set_postfix({k: f"{v.item():.3f}" for k, v in losses.items()})
        elapsed += time.monotonic() - started
        if time.monotonic() - last_save > 60:
            save_checkpoint(out, model, optimizer, step, elapsed)
            last_save = time.monotonic()
    progress_bar.close()
    save_checkpoint(out, model, optimizer, step, elapsed)
    model.config.training = {
        "steps": step,
        "train_seconds": round(elapsed, 1),
        "batch": args.batch,
        "lr": args.lr,
        "pool": args.pool,
        "seed": args.seed,
    }
    return model.eval()


def load_checkpoint(out: Path, model: ReferenceEvaluator, optimizer) -> tuple[int, float]:
    """Restore model and optimizer from `out` if a checkpoint is there; -> (step, seconds trained)."""
    if not (out / CHECKPOINT_FILE).is_file():
        return 0, 0.0
    state = torch.load(out / CHECKPOINT_FILE, map_location=model.device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    print(f"resumed from step {state['step']} ({state['elapsed']:.0f} s trained)")
    return state["step"], state["elapsed"]


def save_checkpoint(out: Path, model, optimizer, step: int, elapsed: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "elapsed": elapsed,
    }
    torch.save(state, out / (CHECKPOINT_FILE + ".tmp"))
    (out / (CHECKPOINT_FILE + ".tmp")).replace(out / CHECKPOINT_FILE)  # atomic: safe to interrupt


# --- measuring --------------------------------------------------------------------------------


@torch.no_grad()
def measure_accuracy(
    model: ReferenceEvaluator,
    images: torch.Tensor,
    labels: dict[str, torch.Tensor],
    batch_size: int = 500,
) -> dict[str, float]:
    """Per-attribute accuracy of the scene reading on images [N, 3, H, W] with slot labels:
    presence over all slots, shape/colour/size over occupied slots, background, whole objects
    and whole scenes exactly right."""
    outputs = [model(batch) for batch in images.split(batch_size)]
    labels = {k: v.to(model.device) for k, v in labels.items()}
    present = labels["present"]
    predicted_present = torch.cat([o.presence for o in outputs]) > 0
    right = {"presence": predicted_present == present}
    for name in ATTRIBUTES:
        right[name] = torch.cat([getattr(o, name) for o in outputs]).argmax(-1) == labels[name]
    right["background"] = (
        torch.cat([o.background for o in outputs]).argmax(-1) == labels["background"]
    )
    object_right = predicted_present & right["shape"] & right["color"] & right["size"]
    scene_right = (right["presence"] & (object_right | ~present)).all(1) & right["background"]
    accuracy = {
        "presence": right["presence"].float().mean(),
        **{name: right[name][present].float().mean() for name in ATTRIBUTES},
        "background": right["background"].float().mean(),
        "object": object_right[present].float().mean(),
        "scene": scene_right.float().mean(),
    }
    return {k: round(float(v), 5) for k, v in accuracy.items()}


def render_in_chunks(
    scenes: list[domain.Scene],
    size: int,
    device: torch.device,
    generator: torch.Generator,
    chunk: int = 1000,
) -> torch.Tensor:
    """Render scenes (with jitter from `generator`) -> [N, 3, size, size] in [0, 1]."""
    return torch.cat(
        [
            domain.render_batch(scenes[i : i + chunk], size, device, generator)
            for i in range(0, len(scenes), chunk)
        ]
    )


def fresh_renders(count: int, seed: int, size: int, device: torch.device):
    """`count` scenes from a seed never used in training, and their renders (with jitter)."""
    rng = np.random.default_rng(seed)
    scenes = [domain.sample_scene(rng) for _ in range(count)]
    return render_in_chunks(scenes, size, device, torch.Generator(device).manual_seed(seed)), scenes


def caption_is_true(
    scenes: list[domain.Scene], prompts: list[domain.Prompt], chunk: int = 256
) -> torch.Tensor:
    """[N] bool: is prompts[i]'s caption true of scenes[i] (see `captions_true_of`)?"""
    labels = slot_labels(scenes)
    ids = [mention_ids(p) for p in prompts]
    mentions, backgrounds = torch.stack([i for i, _ in ids]), torch.tensor([b for _, b in ids])
    return torch.cat(
        [
            captions_true_of(
                {k: v[i : i + chunk] for k, v in labels.items()},
                mentions[i : i + chunk],
                backgrounds[i : i + chunk],
            ).diagonal()
            for i in range(0, len(scenes), chunk)
        ]
    )


def _cosines(model: ReferenceEvaluator, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    return torch.cat(
        [
            model.image_text_similarity(images[i : i + 500], texts[i : i + 500])
            for i in range(0, len(texts), 500)
        ]
    )


def _heldout() -> list[domain.Prompt]:
    try:
        return domain.heldout_prompts()
    except FileNotFoundError:  # the shipped file is not written yet: same prompts, regenerated
        return domain.generate_heldout_prompts()


@torch.no_grad()
def measure_heldout(model: ReferenceEvaluator, device: torch.device, seed: int) -> dict:
    """On renders of the held-out prompts' scenes: alignment (should be ~1) and how the
    image–text cosine separates true captions from false ones."""
    prompts = _heldout()
    scenes = [p.scene for p in prompts]
    images = render_in_chunks(scenes, 64, device, torch.Generator(device).manual_seed(seed))
    result = alignment(prompts, model.predict(images))
    by_richness = {
        str(r): round(
            float(np.mean([s for p, s in zip(prompts, result.scores) if p.richness == r])), 5
        )
        for r in domain.RICHNESS_LEVELS
    }
    others = prompts[1:] + prompts[:1]  # the next prompt's caption: usually false of this image
    own = _cosines(model, images, [p.text for p in prompts])
    other = _cosines(model, images, [p.text for p in others])
    false = ~caption_is_true(scenes, others).to(own.device)
    return {
        "prompts": len(prompts),
        "alignment": round(result.mean, 5),
        "object_accuracy": round(result.object_accuracy, 5),
        "alignment_by_richness": by_richness,
        "cosine_true_caption": round(float(own.mean()), 4),
        "cosine_false_caption": round(float(other[false].mean()), 4),
        "true_above_false": round(float((own[false] > other[false]).float().mean()), 5),
    }


def evaluate(model: ReferenceEvaluator, device: torch.device, count: int, seed: int) -> dict:
    """Clean and augmented accuracy on fresh renders, and the held-out prompt checks."""
    images, scenes = fresh_renders(count, seed, model.config.image_size, device)
    labels = slot_labels(scenes)
    generator = torch.Generator(device).manual_seed(seed)
    perturbed = augment(images, generator, clean_fraction=0.0)
    return {
        "fresh_renders": count,
        "seed": seed,
        "clean": measure_accuracy(model, images, labels),
        "augmented": measure_accuracy(model, perturbed, labels),
        "heldout": measure_heldout(model, device, seed),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, help="checkpoint and export folder (resumes from it)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--minutes", type=float, default=5.0, help="training-time budget")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pool", type=int, default=150_000, help="rendered scenes to sample from")
    parser.add_argument("--eval-count", type=int, default=5_000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    started = time.monotonic()
    model = train(args)
    save_evaluator(model, Path(args.out) / "evaluator")  # kept even if measuring fails
    device = torch.device(args.device)
    metrics = evaluate(model, device, args.eval_count, seed=args.seed + 1_000_003)
    metrics["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    metrics["wall_seconds"] = round(time.monotonic() - started, 1)
    model.config.training["measured"] = metrics
    weights = save_evaluator(model, Path(args.out) / "evaluator")
    print(json.dumps(metrics, indent=1))
    print(f"saved {weights} ({weights.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
