"""The reference world's evaluator: a small CNN trained only on rendered scenes, plus a text tower
trained contrastively with it.

It reads, for every position slot, whether an object is there and its shape, colour and size,
and the background colour (`predict`, for exact alignment); its penultimate layer (FID, GIQA)
and a mid-level spatial map (sFID) are its features (`FeatureExtractor`); and its two
towers give CLIP-style image–text cosines (`ImageTextScorer`). Training: `evaluator_train.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.normalizers import Lowercase
from tokenizers.pre_tokenizers import Whitespace
from torch import Tensor, nn

from qlip.metrics.alignment import PredictedObject, PredictedScene
from qlip.metrics.features import check_images

EVALUATOR_DIR = Path(__file__).parent / "assets" / "evaluator"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "evaluator.safetensors"
CONFIG_VERSION = 1
PAD_TOKEN, UNK_TOKEN = "[PAD]", "[UNK]"


@dataclass
class EvaluatorConfig:
    """Label spaces, vocabulary and architecture; saved as JSON beside the weights."""

    shapes: list[str]
    colors: list[str]
    sizes: list[str]
    positions: list[str]
    backgrounds: list[str]
    vocabulary: list[str]  # word-level; index 0 = PAD_TOKEN, 1 = UNK_TOKEN
    image_size: int = 64
    stage_widths: list[int] = field(default_factory=lambda: [32, 64, 96, 128])
    map_channels: int = 32  # channels of the final 8×8 map
    # sFID reads a mid-level map (after this many stages: 32×32 for 64² inputs), its first
    # channels average-pooled to spatial_pool²: it still sees how shapes are drawn (edges, noise,
    # blur), which the augmentation-invariant global features deliberately ignore.
    spatial_stage: int = 2
    spatial_feature_channels: int = 8
    spatial_pool: int = 8
    global_dim: int = 256
    embed_dim: int = 128
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 48
    version: int = CONFIG_VERSION
    training: dict = field(default_factory=dict)  # recipe and measured accuracy, for the record

    @property
    def slot_logits(self) -> int:
        return 1 + len(self.shapes) + len(self.colors) + len(self.sizes)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> EvaluatorConfig:
        values = json.loads(path.read_text())
        if values.get("version") != CONFIG_VERSION:
            raise ValueError(
                f"{path}: evaluator config version {values.get('version')}, "
                f"this code reads version {CONFIG_VERSION}; retrain or update qlip"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class EvaluatorOutputs:
    """Logits per slot and background, plus the feature tensors."""

    presence: Tensor  # [B, P]
    shape: Tensor  # [B, P, S]
    color: Tensor  # [B, P, C]
    size: Tensor  # [B, P, Z]
    background: Tensor  # [B, K]
    hidden: Tensor  # [B, global_dim] post-ReLU: what the heads and the image projection read
    global_features: Tensor  # [B, global_dim] the same layer before its ReLU (no dead units; FID)
    spatial_map: Tensor  # [B, stage width, H', W'] output of stage `spatial_stage` (sFID)


def build_tokenizer(config: EvaluatorConfig) -> Tokenizer:
    """Word-level tokenizer over the domain vocabulary; unknown words map to UNK_TOKEN."""
    vocabulary = {word: index for index, word in enumerate(config.vocabulary)}
    if vocabulary.get(PAD_TOKEN) != 0 or vocabulary.get(UNK_TOKEN) != 1:
        raise ValueError(f"vocabulary must start with {PAD_TOKEN}, {UNK_TOKEN}")
    tokenizer = Tokenizer(WordLevel(vocabulary, unk_token=UNK_TOKEN))
    tokenizer.normalizer = Lowercase()
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.enable_padding(pad_id=0, pad_token=PAD_TOKEN, length=config.max_tokens)
    tokenizer.enable_truncation(config.max_tokens)
    return tokenizer


def _conv_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    def conv(a: int, b: int) -> list[nn.Module]:
        return [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]

    return nn.Sequential(*conv(in_channels, out_channels), *conv(out_channels, out_channels))


class ImageTower(nn.Module):
    """CNN: stages halve the resolution down to 8×8, a 1×1 conv makes the feature map, a linear
    layer the global features, and linear heads read the slots and the background."""

    def __init__(self, config: EvaluatorConfig):
        super().__init__()
        if not 1 <= config.spatial_stage <= len(config.stage_widths):
            raise ValueError(
                f"spatial_stage must be in 1..{len(config.stage_widths)}; got {config.spatial_stage}"
            )
        widths = [3, *config.stage_widths]
        self.stages = nn.ModuleList(_conv_stage(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.to_map = nn.Sequential(nn.Conv2d(widths[-1], config.map_channels, 1), nn.ReLU())
        map_size = config.image_size // 2 ** (len(config.stage_widths) - 1)
        self.to_global = nn.Sequential(
            nn.Flatten(), nn.Linear(config.map_channels * map_size**2, config.global_dim)
        )
        self.slot_head = nn.Linear(config.global_dim, len(config.positions) * config.slot_logits)
        self.background_head = nn.Linear(config.global_dim, len(config.backgrounds))
        self.config = config

    def forward(self, images: Tensor) -> EvaluatorOutputs:
        x = images * 2 - 1  # images: [B, 3, H, W] in [0, 1]
        for index, stage in enumerate(self.stages):
            x = stage(x if index == 0 else F.avg_pool2d(x, 2))
            if index + 1 == self.config.spatial_stage:
                spatial_map = x
        pre_activation = self.to_global(self.to_map(x))  # [B, global_dim]
        hidden = F.relu(pre_activation)
        slots = self.slot_head(hidden).unflatten(1, (len(self.config.positions), -1))
        shape, color, size = slots[..., 1:].split(
            [len(self.config.shapes), len(self.config.colors), len(self.config.sizes)], dim=-1
        )
        return EvaluatorOutputs(
            slots[..., 0],
            shape,
            color,
            size,
            self.background_head(hidden),
            hidden,
            pre_activation,
            spatial_map,
        )


class TextTower(nn.Module):
    """Token + position embeddings, a small pre-norm transformer, masked mean pooling."""

    def __init__(self, config: EvaluatorConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(
            len(config.vocabulary), config.text_width, padding_idx=0
        )
        self.position_embedding = nn.Parameter(torch.zeros(config.max_tokens, config.text_width))
        layer = nn.TransformerEncoderLayer(
            config.text_width,
            config.text_heads,
            2 * config.text_width,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(
            layer, config.text_layers, enable_nested_tensor=False
        )
        self.norm = nn.LayerNorm(config.text_width)
        self.projection = nn.Linear(config.text_width, config.embed_dim)

    def forward(self, token_ids: Tensor) -> Tensor:
        mask = token_ids != 0  # token_ids: [B, L]
        x = self.token_embedding(token_ids) + self.position_embedding[: token_ids.shape[1]]
        x = self.norm(self.transformer(x, src_key_padding_mask=~mask))  # [B, L, W]
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.projection(pooled)  # [B, embed_dim]


class ReferenceEvaluator(nn.Module):
    """Scene reader, `FeatureExtractor` and `ImageTextScorer` of the reference world.

    Example:
        >>> evaluator = load_evaluator()
        >>> scenes = evaluator.predict(images)          # images: [N, 3, H, W] in [0, 1]
        >>> features = evaluator.global_features(images)  # [N, 256]
    """

    def __init__(self, config: EvaluatorConfig):
        super().__init__()
        self.config = config
        self.image_tower = ImageTower(config)
        self.text_tower = TextTower(config)
        self.image_projection = nn.Linear(config.global_dim, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), as CLIP starts
        self.tokenizer = build_tokenizer(config)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def prepare(self, images: Tensor) -> Tensor:
        """Check images [N, 3, H, W] in [0, 1], move them to the device, resize to image_size."""
        check_images(images)
        images = images.to(self.device, torch.float32)
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, (size, size), mode="bilinear", antialias=True)
        return images

    def forward(self, images: Tensor) -> EvaluatorOutputs:
        """images: [N, 3, H, W] in [0, 1] (any size; resized) -> logits and features."""
        return self.image_tower(self.prepare(images))

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """texts -> token ids [N, max_tokens] on the device."""
        ids = [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def embed_images(self, hidden: Tensor) -> Tensor:
        """Post-ReLU features [N, global_dim] -> unit image embeddings [N, embed_dim]."""
        return F.normalize(self.image_projection(hidden), dim=-1)

    def embed_texts(self, token_ids: Tensor) -> Tensor:
        """Token ids [N, L] -> unit text embeddings [N, embed_dim]."""
        return F.normalize(self.text_tower(token_ids), dim=-1)

    @torch.no_grad()
    def global_features(self, images: Tensor) -> Tensor:
        """images -> [N, global_dim] penultimate-layer features, before the ReLU (FID, GIQA)."""
        return self(images).global_features.float()

    @torch.no_grad()
    def spatial_features(self, images: Tensor) -> Tensor:
        """images -> [N, spatial_feature_channels * spatial_pool²] mid-level map (sFID)."""
        config = self.config
        spatial_map = self(images).spatial_map[:, : config.spatial_feature_channels]
        return F.adaptive_avg_pool2d(spatial_map, config.spatial_pool).flatten(1).float()

    @torch.no_grad()
    def image_text_similarity(self, images: Tensor, texts: Sequence[str]) -> Tensor:
        """images [N, 3, H, W], N texts -> [N] cosine of each image with its text."""
        if len(texts) != len(images):
            raise ValueError(
                f"need one text per image; got {len(texts)} texts, {len(images)} images"
            )
        image_embeddings = self.embed_images(self(images).hidden)
        text_embeddings = self.embed_texts(self.tokenize(texts))
        return (image_embeddings * text_embeddings).sum(-1).float()

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 256) -> list[PredictedScene]:
        """Read the scene of each image: the occupied slots with their attributes, the background."""
        scenes: list[PredictedScene] = []
        for batch in images.split(batch_size):
            scenes += decode_scenes(self(batch), self.config)
        return scenes


def decode_scenes(outputs: EvaluatorOutputs, config: EvaluatorConfig) -> list[PredictedScene]:
    """Logits -> scenes: a slot is occupied where its presence logit is > 0."""
    present = (outputs.presence > 0).cpu()
    shape, color, size = (t.argmax(-1).cpu() for t in (outputs.shape, outputs.color, outputs.size))
    background = outputs.background.argmax(-1).cpu()
    scenes = []
    for b in range(len(present)):
        objects = tuple(
            PredictedObject(
                config.shapes[shape[b, p]],
                config.colors[color[b, p]],
                config.sizes[size[b, p]],
                position,
            )
            for p, position in enumerate(config.positions)
            if present[b, p]
        )
        scenes.append(PredictedScene(objects, config.backgrounds[background[b]]))
    return scenes


def save_evaluator(evaluator: ReferenceEvaluator, folder: str | Path) -> Path:
    """Write fp16 safetensors weights and the JSON config to `folder`; return the weights path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        name: (t.half() if t.is_floating_point() else t).contiguous().cpu()
        for name, t in evaluator.state_dict().items()
    }
    save_file(state, str(folder / WEIGHTS_FILE))
    evaluator.config.save(folder / CONFIG_FILE)
    return folder / WEIGHTS_FILE


def load_evaluator(
    device: str | torch.device = "cpu", folder: str | Path | None = None
) -> ReferenceEvaluator:
    """Load the committed evaluator (or one saved to `folder`), in float32 eval mode.

    Example:
        >>> evaluator = load_evaluator("cuda")
    """
    folder = Path(folder) if folder is not None else EVALUATOR_DIR
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"no evaluator in {folder} (needs {CONFIG_FILE} and {WEIGHTS_FILE}); train one with "
            "`python -m qlip.world.evaluator_train --out DIR` and pass folder=DIR"
        )
    evaluator = ReferenceEvaluator(EvaluatorConfig.load(folder / CONFIG_FILE))
    state = {
        k: v.float() if v.is_floating_point() else v
        for k, v in load_file(str(folder / WEIGHTS_FILE)).items()
    }
    evaluator.load_state_dict(state)
    return evaluator.to(device).eval()
