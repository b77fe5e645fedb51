"""Adapters for real networks: clear errors when something is missing; CLIP on a tiny local model."""

from __future__ import annotations

import json

import pytest
import torch
import torchmetrics.utilities.imports as torchmetrics_imports

from qlip.metrics import HFCLIPScorer, ImageTextScorer, InceptionExtractor
from qlip.metrics.features import INCEPTION_WEIGHTS_FILE


def test_inception_without_torch_fidelity_says_what_to_install(monkeypatch):
    monkeypatch.setattr(torchmetrics_imports, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        InceptionExtractor()


def test_inception_without_weights_says_which_file_to_pass(monkeypatch, tmp_path):
    monkeypatch.setattr(torchmetrics_imports, "_TORCH_FIDELITY_AVAILABLE", True)
    missing = tmp_path / INCEPTION_WEIGHTS_FILE
    with pytest.raises(FileNotFoundError, match=r"weights_path=") as error:
        InceptionExtractor(missing)
    assert str(missing) in str(error.value) and "releases/download" in str(error.value)


def test_clip_scorer_without_a_model_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        HFCLIPScorer(tmp_path / "no-clip-here")


def _tiny_clip_folder(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    words = ["a", "red", "blue", "circle", "square"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab |= {w + "</w>": len(vocab) + i for i, w in enumerate(words)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    # No resize or crop: the test then checks exactly the [0, 1] -> normalised pixel path.
    image_processor = CLIPImageProcessor(do_resize=False, do_center_crop=False)
    processor = CLIPProcessor(image_processor, tokenizer)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=8,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def test_clip_scorer_matches_the_model_on_unit_range_images(tmp_path):
    model, processor = _tiny_clip_folder(tmp_path)
    scorer = HFCLIPScorer(tmp_path)
    assert isinstance(scorer, ImageTextScorer)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    texts = ["a red circle", "a blue square", "a circle"]
    got = scorer.image_text_similarity(images, texts)
    # By hand: normalise [0, 1] pixels with CLIP's mean/std (no /255), project, cosine.
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=(images - mean) / std, **tokens)
    expected = (out.image_embeds * out.text_embeds).sum(-1).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert got.abs().max() <= 1.0
