"""The reference world's evaluator: label logic, tokenizer, save/load, and the committed weights'
accuracy on fresh renders (cheap on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlip.metrics import FeatureExtractor, ImageTextScorer, alignment
from qlip.world import domain
from qlip.world.evaluator import (
    CONFIG_FILE,
    EVALUATOR_DIR,
    WEIGHTS_FILE,
    load_evaluator,
    save_evaluator,
)
from qlip.world.evaluator_train import (
    augment,
    caption_is_true,
    captions_true_of,
    fresh_renders,
    measure_accuracy,
    mention_ids,
    slot_labels,
)

COMMITTED = (EVALUATOR_DIR / CONFIG_FILE).is_file() and (EVALUATOR_DIR / WEIGHTS_FILE).is_file()
needs_weights = pytest.mark.skipif(not COMMITTED, reason="no committed evaluator weights")

RED_CIRCLE = domain.SceneObject("circle", "red", "large", "top left")
BLUE_STAR = domain.SceneObject("star", "blue", "small", "center")
SCENE = domain.Scene((RED_CIRCLE, BLUE_STAR), "white")


def test_slot_labels_put_objects_in_their_position_slots():
    labels = slot_labels([SCENE])
    assert labels["present"][0].tolist() == [True, False, True, False, False]
    assert labels["shape"][0].tolist() == [
        domain.SHAPES.index("circle"),
        -100,
        domain.SHAPES.index("star"),
        -100,
        -100,
    ]
    assert labels["background"].tolist() == [list(domain.BACKGROUNDS).index("white")]


@pytest.mark.parametrize(
    "mentions, background, expected",
    [
        ([domain.Mention("circle", None, None, None)], None, True),
        ([domain.Mention("circle", "blue", None, None)], None, False),  # both exist, not together
        ([domain.Mention("star", "blue", "small", "center")], "white", True),
        ([domain.Mention("star", "blue", "small", "top left")], None, False),  # wrong slot
        ([domain.Mention("circle", None, None, None)], "black", False),  # wrong background
    ],
)
def test_caption_truth_needs_every_mention_on_one_object(mentions, background, expected):
    prompt = domain.Prompt("", 0, SCENE, tuple(mentions), background, 0)
    ids, background_id = mention_ids(prompt)
    labels = slot_labels([SCENE])
    truth = captions_true_of(labels, ids[None], torch.tensor([background_id]))
    assert truth.tolist() == [[expected]]


def test_augment_stays_in_range_changes_images_and_is_seeded():
    images = domain.render_batch([SCENE] * 4, 32)
    first = augment(images, torch.Generator().manual_seed(0), clean_fraction=0.0)
    again = augment(images, torch.Generator().manual_seed(0), clean_fraction=0.0)
    assert torch.equal(first, again)
    assert first.min() >= 0 and first.max() <= 1
    assert (first - images).abs().mean() > 0.005


@pytest.fixture(scope="module")
def evaluator():
    if not COMMITTED:
        pytest.skip("no committed evaluator weights")
    return load_evaluator("cpu")


@pytest.fixture(scope="module")
def renders():
    images, scenes = fresh_renders(200, seed=424242, size=64, device=torch.device("cpu"))
    return images, scenes, slot_labels(scenes)


@needs_weights
def test_tokenizer_maps_unknown_words_to_unk(evaluator):
    ids = evaluator.tokenize(["A RED zebra"])[0].tolist()
    vocabulary = evaluator.config.vocabulary
    assert ids[:3] == [vocabulary.index("a"), vocabulary.index("red"), 1]
    assert ids[3:] == [0] * (evaluator.config.max_tokens - 3)


@needs_weights
def test_committed_evaluator_reads_fresh_renders(evaluator, renders):
    images, _, labels = renders
    accuracy = measure_accuracy(evaluator, images, labels)
    for name in ("presence", "shape", "color", "size", "background"):
        assert accuracy[name] >= 0.95, (name, accuracy)
    perturbed = augment(images, torch.Generator().manual_seed(1), clean_fraction=0.0)
    assert measure_accuracy(evaluator, perturbed, labels)["object"] >= 0.9


@needs_weights
def test_committed_evaluator_aligns_renders_with_their_captions(evaluator, renders):
    images, scenes, _ = renders
    rng = np.random.default_rng(7)
    prompts = [domain.describe(s, int(rng.choice(domain.RICHNESS_LEVELS)), rng) for s in scenes]
    assert alignment(prompts, evaluator.predict(images)).mean >= 0.95
    # The image–text cosine ranks a caption that is true of the image above one that is not.
    others = prompts[1:] + prompts[:1]
    false = ~caption_is_true(scenes, others)
    own = evaluator.image_text_similarity(images, [p.text for p in prompts])
    other = evaluator.image_text_similarity(images, [p.text for p in others])
    assert false.sum() > 100
    assert (own[false] > other[false]).float().mean() >= 0.9


@needs_weights
def test_evaluator_is_an_extractor_and_scorer_for_any_image_size(evaluator):
    assert isinstance(evaluator, FeatureExtractor) and isinstance(evaluator, ImageTextScorer)
    small = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert evaluator.global_features(small).shape == (3, evaluator.config.global_dim)
    channels = evaluator.config.spatial_feature_channels
    assert evaluator.spatial_features(small).shape == (
        3,
        channels * evaluator.config.spatial_pool**2,
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluator.global_features(small * 255)


@needs_weights
def test_save_load_round_trip_is_exact(evaluator, tmp_path):
    save_evaluator(evaluator, tmp_path)
    reloaded = load_evaluator("cpu", tmp_path)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(reloaded.global_features(images), evaluator.global_features(images))
    assert (tmp_path / WEIGHTS_FILE).stat().st_size <= 4 * 2**20
