"""Exact text–image alignment in the reference world: the fraction of the attributes a prompt
states that an evaluator finds in the generated image.

Each object mention is matched to at most one predicted object (best assignment, scipy's
`linear_sum_assignment`, maximising the attributes found). A mention that states a position can
only match the object predicted at that slot; its position then counts as found. The
background counts as one attribute when the prompt states it. Besides this attribute fraction,
`objects_fully_found` counts mentions whose stated attributes were all found on one object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

OBJECT_ATTRIBUTES = ("shape", "color", "size", "position")


@dataclass(frozen=True)
class PredictedObject:
    """What the evaluator sees in one position slot."""

    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class PredictedScene:
    """The evaluator's reading of one image: the occupied slots and the background."""

    objects: tuple[PredictedObject, ...]
    background: str


@dataclass(frozen=True)
class PromptAlignment:
    """Alignment of one image with its prompt."""

    attributes_found: int
    attributes_mentioned: int
    objects_fully_found: int
    objects_mentioned: int

    @property
    def score(self) -> float:
        """Fraction of mentioned attributes found (1.0 when the prompt states nothing)."""
        return (
            self.attributes_found / self.attributes_mentioned if self.attributes_mentioned else 1.0
        )


@dataclass(frozen=True)
class AlignmentResult:
    """Per-prompt alignments and their summaries."""

    per_prompt: tuple[PromptAlignment, ...]

    @property
    def scores(self) -> np.ndarray:
        """Per-prompt attribute fractions [N]."""
        return np.array([p.score for p in self.per_prompt])

    @property
    def mean(self) -> float:
        """Mean over prompts of the per-prompt attribute fraction."""
        return float(self.scores.mean())

    @property
    def object_accuracy(self) -> float:
        """Fraction of all object mentions found with every stated attribute."""
        mentioned = sum(p.objects_mentioned for p in self.per_prompt)
        return sum(p.objects_fully_found for p in self.per_prompt) / mentioned if mentioned else 1.0


def _stated(mention) -> list[str]:
    return [name for name in OBJECT_ATTRIBUTES if getattr(mention, name) is not None]


def _attributes_found(mention, predicted: PredictedObject) -> int:
    """Stated attributes of `mention` present on `predicted`; 0 if a stated slot differs."""
    if mention.position is not None and mention.position != predicted.position:
        return 0
    return sum(getattr(mention, name) == getattr(predicted, name) for name in _stated(mention))


def align_prompt(
    mentions: Sequence, background: str | None, predicted: PredictedScene
) -> PromptAlignment:
    """Alignment of one prediction with a prompt's `mentions` and stated `background`.

    Example:
        >>> align_prompt(prompt.mentions, prompt.background, evaluator.predict(image)[0]).score
    """
    stated = [len(_stated(m)) for m in mentions]
    found_per_mention = np.zeros(len(mentions), dtype=int)
    if mentions and predicted.objects:
        # found: [mentions, predicted objects]
        found = np.array([[_attributes_found(m, o) for o in predicted.objects] for m in mentions])
        rows, cols = linear_sum_assignment(found, maximize=True)
        found_per_mention[rows] = found[rows, cols]
    background_mentioned = background is not None
    background_found = background_mentioned and background == predicted.background
    fully = sum(int(f == s) for f, s in zip(found_per_mention, stated) if s > 0)
    return PromptAlignment(
        attributes_found=int(found_per_mention.sum()) + int(background_found),
        attributes_mentioned=sum(stated) + int(background_mentioned),
        objects_fully_found=fully,
        objects_mentioned=sum(s > 0 for s in stated),
    )


def alignment(prompts: Sequence, predictions: Sequence[PredictedScene]) -> AlignmentResult:
    """Alignment of each prediction with its prompt (objects with `.mentions`, `.background`,
    such as `qlip.world.domain.Prompt`).

    Example:
        >>> result = alignment(prompts, evaluator.predict(images))
        >>> result.mean, result.scores
    """
    if len(prompts) != len(predictions):
        raise ValueError(
            f"need one prediction per prompt; got {len(predictions)} for {len(prompts)}"
        )
    return AlignmentResult(
        tuple(align_prompt(p.mentions, p.background, s) for p, s in zip(prompts, predictions))
    )
