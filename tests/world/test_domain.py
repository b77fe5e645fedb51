"""The reference world's domain: determinism, captions, held-out split, rendering, tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from qlip.world import domain
from qlip.world.domain import (
    BACKGROUNDS,
    COLORS,
    POSITION_CENTERS,
    RICHNESS_LEVELS,
    Scene,
    SceneObject,
    describe,
    heldout_prompts,
    is_heldout_combination,
    render,
    sample_scene,
    training_prompts,
)


def test_training_prompts_are_deterministic_by_seed():
    assert training_prompts(50, seed=3) == training_prompts(50, seed=3)
    assert training_prompts(50, seed=3) != training_prompts(50, seed=4)


def test_richness_zero_mentions_only_one_noun():
    rng = np.random.default_rng(0)
    for _ in range(200):
        prompt = describe(sample_scene(rng), 0, rng)
        (mention,) = prompt.mentions
        assert mention.shape is not None and mention.shape in prompt.text
        assert (mention.color, mention.size, mention.position, prompt.background) == (None,) * 4
        assert not any(color in prompt.text for color in COLORS)


def test_top_richness_mentions_every_attribute_and_background():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = sample_scene(rng)
        prompt = describe(scene, max(RICHNESS_LEVELS), rng)
        said = {(m.shape, m.color, m.size, m.position) for m in prompt.mentions}
        assert said == {(o.shape, o.color, o.size, o.position) for o in scene.objects}
        assert prompt.background == scene.background and scene.background in prompt.text


def test_wording_varies_within_a_level():
    rng = np.random.default_rng(2)
    scene = Scene((SceneObject("circle", "red", "large", "top left"),), "white")
    texts = {describe(scene, 4, rng).text for _ in range(100)}
    assert len(texts) >= 10


def test_heldout_combinations_never_in_training_but_in_shipped_set():
    training = training_prompts(50_000, seed=11)
    assert not any(is_heldout_combination(o) for p in training for o in p.scene.objects)
    shipped = heldout_prompts()
    assert len(shipped) == 3000
    with_heldout = [p for p in shipped if any(is_heldout_combination(o) for o in p.scene.objects)]
    assert 0.1 < len(with_heldout) / len(shipped) < 0.5
    assert {p.richness for p in shipped} == set(RICHNESS_LEVELS)
    assert {len(p.scene.objects) for p in shipped} == {1, 2, 3}


def test_shipped_set_matches_its_generator():
    regenerated = domain.generate_heldout_prompts()
    assert regenerated[:100] == heldout_prompts()[:100]


def test_describe_rejects_unknown_richness():
    with pytest.raises(ValueError, match="richness"):
        describe(sample_scene(np.random.default_rng(0)), 9, np.random.default_rng(0))


@pytest.mark.parametrize("shape", domain.SHAPES)
def test_render_colours_object_centre_and_background(shape):
    position = "bottom right"
    scene = Scene((SceneObject(shape, "blue", "large", position),), "beige")
    image = render(scene, size=64, rng=np.random.default_rng(0))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    x, y = (int(c * 64) for c in POSITION_CENTERS[position])
    assert np.abs(image[y, x].astype(int) - COLORS["blue"]).max() <= 2
    assert np.abs(image[2, 2].astype(int) - BACKGROUNDS["beige"]).max() <= 2
    edge_values = {tuple(p) for p in image.reshape(-1, 3)}
    assert len(edge_values) > 3  # anti-aliased: blended colours along the outline


def test_render_is_deterministic_and_jitter_moves_objects():
    scene = sample_scene(np.random.default_rng(5))
    first = render(scene, rng=np.random.default_rng(1))
    assert np.array_equal(first, render(scene, rng=np.random.default_rng(1)))
    assert not np.array_equal(first, render(scene, rng=np.random.default_rng(2)))


def test_shapes_render_differently():
    images = [
        render(Scene((SceneObject(s, "red", "large", "center"),), "white"))
        for s in domain.SHAPES
    ]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            differing = (np.abs(images[i].astype(int) - images[j]).sum(-1) > 100).sum()
            assert differing > 40, (domain.SHAPES[i], domain.SHAPES[j])


def test_pixel_checker_reads_real_renders():
    from qlip.world.train_eval import alignment_report

    prompts = heldout_prompts()[::100]
    images = np.stack([render(p.scene, rng=np.random.default_rng(p.seed)) for p in prompts])
    report = alignment_report(prompts, images)
    assert report["overall"] > 0.98
    flat = np.full_like(images, 128)
    assert alignment_report(prompts, flat)["overall"] < 0.3


def test_heldout_free_prompts_hold_no_heldout_text():
    held = {p.text for p in heldout_prompts()}
    prompts = domain.heldout_free_prompts(3000, seed=0)
    assert len(prompts) == 3000 and not {p.text for p in prompts} & held
    assert domain.heldout_free_prompts(100, seed=0) == prompts[:100]  # a prefix of a longer call
    # every richness-0/1 text of the world is a held-out text: none is left
    assert {p.richness for p in prompts} == {2, 3, 4}
    assert not any(is_heldout_combination(o) for p in prompts for o in p.scene.objects)
