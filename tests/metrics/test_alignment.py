"""Exact alignment on hand-made predictions and prompts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qlip.metrics import PredictedObject, PredictedScene, align_prompt, alignment
from qlip.world.domain import Mention

RED_CIRCLE = PredictedObject("circle", "red", "large", "top left")
BLUE_STAR = PredictedObject("star", "blue", "small", "center")
FULL_RED_CIRCLE = Mention("circle", "red", "large", "top left")
FULL_BLUE_STAR = Mention("star", "blue", "small", "center")


def _prompt(mentions, background=None):
    return SimpleNamespace(mentions=tuple(mentions), background=background)


def test_everything_found_scores_one():
    scene = PredictedScene((RED_CIRCLE, BLUE_STAR), "white")
    result = align_prompt((FULL_BLUE_STAR, FULL_RED_CIRCLE), "white", scene)
    assert (result.attributes_found, result.attributes_mentioned) == (9, 9)
    assert result.score == 1.0 and result.objects_fully_found == 2


def test_one_wrong_attribute_costs_its_share():
    scene = PredictedScene((PredictedObject("circle", "green", "large", "top left"),), "white")
    result = align_prompt((FULL_RED_CIRCLE,), "white", scene)
    assert result.score == pytest.approx(4 / 5)  # shape, size, position, background; not colour
    assert result.objects_fully_found == 0


def test_mention_with_a_position_only_matches_that_slot():
    moved = PredictedScene((PredictedObject("circle", "red", "large", "bottom right"),), "black")
    result = align_prompt((FULL_RED_CIRCLE,), "black", moved)
    assert (result.attributes_found, result.attributes_mentioned) == (1, 5)  # background only


def test_mentions_are_matched_by_best_assignment_not_greedily():
    # "a circle" first would greedily take the red circle, leaving "a red circle" one attribute.
    scene = PredictedScene(
        (RED_CIRCLE, PredictedObject("circle", "blue", "small", "center")), "gray"
    )
    mentions = (Mention("circle", None, None, None), Mention("circle", "red", None, None))
    assert align_prompt(mentions, None, scene).score == 1.0


def test_one_object_cannot_serve_two_mentions():
    scene = PredictedScene((RED_CIRCLE,), "white")
    mentions = (Mention("circle", "red", None, None), Mention("circle", "red", None, None))
    result = align_prompt(mentions, None, scene)
    assert result.score == pytest.approx(2 / 4)


def test_empty_prediction_and_background_mismatch_score_zero():
    result = align_prompt((FULL_RED_CIRCLE,), "white", PredictedScene((), "black"))
    assert result.score == 0.0


def test_alignment_over_prompts_gives_scores_mean_and_object_accuracy():
    predictions = [PredictedScene((RED_CIRCLE,), "white"), PredictedScene((BLUE_STAR,), "white")]
    prompts = [_prompt([Mention("circle", None, None, None)]), _prompt([FULL_RED_CIRCLE], "white")]
    result = alignment(prompts, predictions)
    assert result.scores.tolist() == [1.0, pytest.approx(1 / 5)]
    assert result.mean == pytest.approx(0.6)
    assert result.object_accuracy == 0.5
    with pytest.raises(ValueError, match="one prediction per prompt"):
        alignment(prompts, predictions[:1])
