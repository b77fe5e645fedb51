"""text_states reads hidden and pooled states from every form of text-encoder output."""

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from qlip.pipeline.prompts import text_states


@pytest.mark.parametrize("kind", [CLIPTextModel, CLIPTextModelWithProjection])
def test_tuples_and_model_outputs_give_the_same_states(kind):
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=20,
                            num_attention_heads=2, num_hidden_layers=1, projection_dim=8,
                            max_position_embeddings=12)
    encoder = kind(config).eval()
    ids = torch.randint(50, (2, 12))
    with torch.no_grad():
        named = text_states(encoder(ids))
        plain = text_states(encoder(ids, return_dict=False))
    assert named[0].shape == (2, 12, 16)
    assert named[1].shape == (2, 8 if kind is CLIPTextModelWithProjection else 16)
    assert all(torch.equal(a, b) for a, b in zip(named, plain))
