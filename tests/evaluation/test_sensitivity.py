"""The feature-sensitivity check (small size): the fidelity features respond monotonically to
noise, blur, colour cast, posterization and the VAE's own artifacts, and see damage the global
features are trained to ignore."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlip.evaluation.measures import WorldExtractor
from qlip.evaluation.sensitivity import STRENGTHS, degrade, is_monotone, sensitivity
from qlip.metrics import fid_from_features
from qlip.world.domain import render_batch, sample_scene
from qlip.world.evaluator import load_evaluator

N = 64
# three of the four strengths of each kind (the suite's size; the benchmark measures all four)
SMALL = {kind: values[1:] for kind, values in STRENGTHS.items()}


def _renders(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(N)]
    return render_batch(scenes, 64, "cpu", torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def extractor():
    return WorldExtractor(load_evaluator("cpu"))


@pytest.fixture(scope="module")
def vae():
    from qlip.world.reference import load_reference_pipeline

    model = load_reference_pipeline("cpu").vae

    @torch.no_grad()
    def reconstruct(images):
        return ((model.decode(model.encode(images * 2 - 1).latent_dist.mean).sample + 1) / 2)

    return reconstruct


def test_fidelity_features_respond_monotonically_to_every_degradation(extractor, vae):
    table = sensitivity({"fidelity": extractor.fidelity_features}, _renders(1), SMALL,
                        reconstruct=vae)
    assert set(table["fidelity"]) == set(STRENGTHS)
    for kind, values in table["fidelity"].items():
        assert is_monotone(values), (kind, values)


def test_fidelity_features_see_noise_the_global_features_ignore(extractor):
    clean, other = _renders(1), _renders(2)
    noisy = degrade(clean, "noise", 0.1)
    ratios = {}
    for name in ("global", "fidelity"):
        fn = getattr(extractor, f"{name}_features")
        floor = fid_from_features(fn(clean).double(), fn(other).double())  # content differences
        ratios[name] = fid_from_features(fn(clean).double(), fn(noisy).double()) / floor
    # σ = 0.1 noise: ~2% of the content floor in global features, several floors in these
    assert ratios["global"] < 0.1 and ratios["fidelity"] > 1.0, ratios


def test_degrade_refuses_unknown_kinds_and_vae_without_a_model():
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown degradation 'jpeg'"):
        degrade(images, "jpeg", 1)
    with pytest.raises(ValueError, match="needs reconstruct"):
        degrade(images, "vae", 1.0)
    assert degrade(images, "posterize", 2).unique().tolist() == [0.0, 1.0]
