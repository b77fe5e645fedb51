"""The Inception FID/sFID path of a user's model (``InceptionExtractor``: uint8 conversion, the
sFID hook at ``Mixed_6d.branch1x1``, its first 7 channels), run on ``qlip.testing.TinyInception``
instead of torch-fidelity's weights; nothing is downloaded."""

import pytest
import torch

from qlip.metrics import InceptionExtractor, fid_from_images, sfid_from_images
from qlip.metrics.features import SFID_CHANNELS
from qlip.testing import TinyInception


def _images(seed, shift=0.0, n=24):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g) * 0.5 + shift).clamp(0, 1)


def test_inception_extractor_features_and_fid_on_a_tiny_inception():
    extractor = InceptionExtractor(network=TinyInception())
    real = _images(0)
    assert extractor.global_features(real).shape == (24, 16)
    spatial = extractor.spatial_features(real)
    assert spatial.shape == (24, SFID_CHANNELS * 3 * 3)
    x = torch.nn.functional.interpolate((real * 255).round() / 127.5 - 1, size=(7, 7),
                                        mode="bilinear", align_corners=False)
    network = extractor.network  # the hook's map is the layer's output, its first 7 channels
    layer = network.Mixed_6d.branch1x1(torch.relu(network.stem(x)))
    assert torch.allclose(spatial, layer[:, :SFID_CHANNELS].flatten(1).double(), atol=1e-5)
    assert fid_from_images(extractor, real, real) == pytest.approx(0.0, abs=1e-6)
    same_kind, brighter = _images(1), _images(1, shift=0.4)
    near, far = fid_from_images(extractor, real, same_kind), fid_from_images(extractor, real, brighter)
    assert 0 < near < far  # another draw of the same images is closer than shifted ones
    assert sfid_from_images(extractor, real, same_kind) < sfid_from_images(extractor, real, brighter)


def test_missing_inception_weights_say_which_file_and_which_flag(tmp_path, monkeypatch):
    import torchmetrics.utilities.imports as imports

    monkeypatch.setattr(imports, "_TORCH_FIDELITY_AVAILABLE", True)  # as with qlip[metrics]
    with pytest.raises(FileNotFoundError, match=r"weights-inception-2015-12-05.*--inception-weights"):
        InceptionExtractor(tmp_path / "none.pth")
