"""The reference world: procedural captioned scenes of flat shapes, deterministic by seed.

A scene holds 1-3 objects (shape, colour, size, position slot) on a flat background. Captions
describe a scene at a controlled richness level, from a bare noun ("a circle", level 0) to every
attribute of every object plus the background (level 4), with varied wording. A few
(shape, colour) combinations never occur in training scenes; the shipped held-out set contains
them in a fraction of its prompts.

Example:
    >>> rng = np.random.default_rng(0)
    >>> prompt = describe(sample_scene(rng), richness=2, rng=rng)
    >>> image = render(prompt.scene, rng=np.random.default_rng(prompt.seed))  # uint8 [64, 64, 3]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from qlip.world.render import rasterize

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 60, 200),
    "cyan": (30, 200, 210),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "center", "bottom left", "bottom right")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "beige": (225, 210, 170),
}
RICHNESS_LEVELS: tuple[int, ...] = (0, 1, 2, 3, 4)
MAX_OBJECTS = 3

# Slot centres (x, y) and radii, in image units; slots are far enough apart that objects at
# the largest size and jitter never overlap.
POSITION_CENTERS: dict[str, tuple[float, float]] = {
    "top left": (0.18, 0.18),
    "top right": (0.82, 0.18),
    "center": (0.5, 0.5),
    "bottom left": (0.18, 0.82),
    "bottom right": (0.82, 0.82),
}
SIZE_RADII: dict[str, float] = {"small": 0.09, "large": 0.15}
POSITION_JITTER = 0.015  # +- image units
SIZE_JITTER = 0.08  # +- relative

# Never in training scenes: one unseen colour per shape for three shapes.
HELDOUT_COMBINATIONS: frozenset[tuple[str, str]] = frozenset(
    {("circle", "blue"), ("square", "yellow"), ("triangle", "purple")}
)
HELDOUT_SEED = 20250711
HELDOUT_PER_CELL = 200  # prompts per (richness level, object count): 5 x 3 x 200 = 3,000
HELDOUT_FILE = "heldout_prompts.jsonl"


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str  # one of POSITIONS; at most one object per slot


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # 1..3 objects
    background: str


@dataclass(frozen=True)
class Mention:
    """What a caption says about one object; None = not said."""

    shape: str | None
    color: str | None
    size: str | None
    position: str | None


@dataclass(frozen=True)
class Prompt:
    text: str
    richness: int
    scene: Scene  # the scene it was written from (renders of it are the "real" images)
    mentions: tuple[Mention, ...]  # one per mentioned object, in caption order
    background: str | None  # background if the caption states it
    seed: int  # seeds the render jitter of the "real" image


def is_heldout_combination(obj: SceneObject) -> bool:
    """True if the object's (shape, colour) pair never appears in training scenes."""
    return (obj.shape, obj.color) in HELDOUT_COMBINATIONS


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, include_heldout: bool = True) -> Scene:
    """Sample 1-3 objects in distinct slots and a background.

    With ``include_heldout=False`` the held-out (shape, colour) pairs are never drawn.
    """
    num_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.3, 0.3]))
    slots = rng.permutation(len(POSITIONS))[:num_objects]
    objects = []
    for slot in sorted(slots):
        while True:
            obj = SceneObject(
                shape=_pick(rng, SHAPES),
                color=_pick(rng, tuple(COLORS)),
                size=_pick(rng, SIZES),
                position=POSITIONS[slot],
            )
            if include_heldout or not is_heldout_combination(obj):
                break
        objects.append(obj)
    return Scene(objects=tuple(objects), background=_pick(rng, tuple(BACKGROUNDS)))


# --- captions ---------------------------------------------------------------------------------

_PREFIXES = ("", "a picture of ", "an image of ", "a drawing of ", "there is ", "a photo of ")
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_POSITION_PHRASES = (
    "in the {p}",
    "at the {p}",
    "in the {p} corner",
)
_CENTER_PHRASES = ("in the center", "in the middle", "at the center")
_BACKGROUND_PHRASES = (
    "on a {b} background",
    "against a {b} background",
    "with a {b} background",
    "on {b}",
)
_JOINERS = (" and ", ", ", " with ", " next to ")


def _object_phrase(obj: SceneObject, richness: int, rng: np.random.Generator) -> tuple[str, Mention]:
    """'a circle' (0), 'a red circle' (1, 2), 'a big red circle in the top left' (3, 4)."""
    if richness == 0:
        return f"a {obj.shape}", Mention(obj.shape, None, None, None)
    if richness <= 2:
        return f"a {obj.color} {obj.shape}", Mention(obj.shape, obj.color, None, None)
    size_word = _pick(rng, _SIZE_WORDS[obj.size])
    if obj.position == "center":
        where = _pick(rng, _CENTER_PHRASES)
    else:
        where = _pick(rng, _POSITION_PHRASES).format(p=obj.position)
    text = f"a {size_word} {obj.color} {obj.shape} {where}"
    return text, Mention(obj.shape, obj.color, obj.size, obj.position)


def describe(scene: Scene, richness: int, rng: np.random.Generator) -> Prompt:
    """Write a caption of ``scene`` at ``richness`` (see RICHNESS_LEVELS), with varied wording.

    Levels 0 and 1 mention one object (shape; colour and shape), level 2 the colour and shape of
    every object, level 3 adds size and position, level 4 adds the background.
    """
    if richness not in RICHNESS_LEVELS:
        raise ValueError(f"richness must be one of {RICHNESS_LEVELS}; got {richness}")
    if richness <= 1:
        described = (_pick(rng, scene.objects),)
    else:
        described = tuple(scene.objects[i] for i in rng.permutation(len(scene.objects)))
    phrases, mentions = zip(*(_object_phrase(obj, richness, rng) for obj in described))
    text = phrases[0]
    for phrase in phrases[1:]:
        text += _pick(rng, _JOINERS) + phrase
    background = None
    if richness == 4:
        background = scene.background
        text += " " + _pick(rng, _BACKGROUND_PHRASES).format(b=background)
    text = _pick(rng, _PREFIXES) + text
    seed = int(rng.integers(2**31 - 1))
    return Prompt(text, richness, scene, tuple(mentions), background, seed)


def training_prompts(n: int, seed: int,
                     richness_weights: Sequence[float] | None = None) -> list[Prompt]:
    """``n`` prompts over scenes without held-out combinations.

    Richness is uniform over the levels, or drawn with ``richness_weights`` (one weight per
    level, normalised), e.g. to show the model more captions that state positions.
    """
    rng = np.random.default_rng(seed)
    probabilities = None
    if richness_weights is not None:
        weights = np.asarray(richness_weights, dtype=float)
        if weights.shape != (len(RICHNESS_LEVELS),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"richness_weights needs {len(RICHNESS_LEVELS)} non-negative "
                             f"weights, one per level, not all zero; got {richness_weights}")
        probabilities = weights / weights.sum()
    stream = _training_stream(rng, probabilities)
    return [next(stream) for _ in range(n)]


def _training_stream(rng: np.random.Generator, probabilities: np.ndarray | None = None):
    """Training prompts one after another (``training_prompts(n)`` is a prefix of this)."""
    while True:
        scene = sample_scene(rng, include_heldout=False)
        yield describe(scene, int(rng.choice(RICHNESS_LEVELS, p=probabilities)), rng)


def heldout_free_prompts(n: int, seed: int) -> list[Prompt]:
    """``n`` prompts of the training distribution whose texts are none of the held-out set's:
    what a bit policy (QLIP's T2Q and Q2B) trains on, so that an evaluation on held-out prompts
    never scores a text the policy was fitted to. A prefix of a longer call with the same seed.

    Every richness-0 and -1 text of the world (24 and 126 distinct texts) is in the held-out
    set, so these prompts are of richness 2-4 only (41% of level-2 draws are dropped too).
    """
    excluded = {p.text for p in heldout_prompts()}
    stream = _training_stream(np.random.default_rng(seed))
    prompts: list[Prompt] = []
    for draws, prompt in enumerate(stream):
        if prompt.text not in excluded:
            prompts.append(prompt)
        if len(prompts) == n:
            return prompts
        if draws > 100 * n + 10_000:  # cannot happen with this world's captions; never spin
            raise RuntimeError("the training distribution yields almost only held-out texts")
    return prompts


def richness_series(num_scenes: int, seed: int, min_objects: int = 2) -> list[Prompt]:
    """``num_scenes`` scenes (of at least ``min_objects`` objects, drawn from the full
    distribution), each described at every richness level in turn: richness-controlled captions
    of one scene, from a bare noun to the full description (QLIP's Fig. S4)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(num_scenes):
        scene = sample_scene(rng)
        while len(scene.objects) < min_objects:
            scene = sample_scene(rng)
        prompts += [describe(scene, level, rng) for level in RICHNESS_LEVELS]
    return prompts


# --- the held-out set -------------------------------------------------------------------------


def generate_heldout_prompts(seed: int = HELDOUT_SEED) -> list[Prompt]:
    """The evaluation set: HELDOUT_PER_CELL prompts per (richness, object count) cell.

    Scenes are drawn from the full distribution, so held-out combinations appear where chance
    puts them (about a third of the prompts' scenes hold one).
    """
    rng = np.random.default_rng(seed)
    prompts = []
    for richness in RICHNESS_LEVELS:
        for num_objects in range(1, MAX_OBJECTS + 1):
            cell = []
            while len(cell) < HELDOUT_PER_CELL:
                scene = sample_scene(rng)
                if len(scene.objects) == num_objects:
                    cell.append(describe(scene, richness, rng))
            prompts.extend(cell)
    return prompts


def prompt_to_dict(prompt: Prompt) -> dict:
    return asdict(prompt)


def prompt_from_dict(data: dict) -> Prompt:
    scene = Scene(
        objects=tuple(SceneObject(**obj) for obj in data["scene"]["objects"]),
        background=data["scene"]["background"],
    )
    mentions = tuple(Mention(**mention) for mention in data["mentions"])
    return Prompt(
        data["text"], data["richness"], scene, mentions, data["background"], data["seed"]
    )


def write_heldout_prompts(path: str | Path) -> None:
    """Write the held-out set as JSON lines (run once; the file ships with the package)."""
    with open(path, "w") as handle:
        for prompt in generate_heldout_prompts():
            handle.write(json.dumps(prompt_to_dict(prompt)) + "\n")


def heldout_prompts() -> list[Prompt]:
    """The shipped evaluation set (3,000 prompts), read from ``assets/heldout_prompts.jsonl``."""
    asset = resources.files("qlip.world") / "assets" / HELDOUT_FILE
    if not asset.is_file():
        raise FileNotFoundError(
            f"{asset} is missing; regenerate it with "
            "`python -c 'from qlip.world.domain import write_heldout_prompts as w; w(PATH)'`"
        )
    lines = asset.read_text().splitlines()
    return [prompt_from_dict(json.loads(line)) for line in lines if line.strip()]


# --- rendering --------------------------------------------------------------------------------


def scene_tensors(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Scenes as padded tensors (K = MAX_OBJECTS): shape/size/position/colour ids, presence, bg."""
    count = len(scenes)
    ids = {key: torch.zeros(count, MAX_OBJECTS, dtype=torch.long) for key in
           ("shape", "color", "size", "position")}
    present = torch.zeros(count, MAX_OBJECTS, dtype=torch.bool)
    background = torch.zeros(count, dtype=torch.long)
    color_names, background_names = tuple(COLORS), tuple(BACKGROUNDS)
    for i, scene in enumerate(scenes):
        background[i] = background_names.index(scene.background)
        for k, obj in enumerate(scene.objects):
            ids["shape"][i, k] = SHAPES.index(obj.shape)
            ids["color"][i, k] = color_names.index(obj.color)
            ids["size"][i, k] = SIZES.index(obj.size)
            ids["position"][i, k] = POSITIONS.index(obj.position)
            present[i, k] = True
    return {**ids, "present": present, "background": background}


def render_tensors(
    scene: dict[str, torch.Tensor],
    size: int = 64,
    generator: torch.Generator | None = None,
    supersample: int = 4,
) -> torch.Tensor:
    """Render scenes given as ``scene_tensors`` (on any device); jitter only with a generator.

    Returns [B, 3, size, size] float in [0, 1].
    """
    device = scene["shape"].device
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32, device=device) / 255
    backdrops = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32, device=device) / 255
    slot_centers = torch.tensor(list(POSITION_CENTERS.values()), device=device)
    slot_radii = torch.tensor([SIZE_RADII[s] for s in SIZES], device=device)
    centers = slot_centers[scene["position"]]  # centers: [B, K, 2]
    radii = slot_radii[scene["size"]]  # radii: [B, K]
    if generator is not None:
        noise = torch.rand(*centers.shape[:2], 3, device=device, generator=generator) * 2 - 1
        centers = centers + POSITION_JITTER * noise[..., :2]
        radii = radii * (1 + SIZE_JITTER * noise[..., 2])
    return rasterize(
        scene["shape"], centers, radii, palette[scene["color"]], scene["present"],
        backdrops[scene["background"]], SHAPES, size, supersample,
    )


def render_batch(
    scenes: list[Scene],
    size: int = 64,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Render a batch of scenes on ``device``: float [B, 3, size, size] in [0, 1]."""
    tensors = {key: value.to(device) for key, value in scene_tensors(scenes).items()}
    return render_tensors(tensors, size, generator)


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render one scene as uint8 [size, size, 3]; ``rng`` adds small position/size jitter."""
    generator = None
    if rng is not None:
        generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
    image = render_batch([scene], size, "cpu", generator)[0]
    return (image.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
