"""Turning prompts into what bit policies read, with the tokenizer-limit check."""

from __future__ import annotations

import torch

from ..policies import PromptBatch


def text_towers(pipe) -> list[tuple[object, torch.nn.Module]]:
    """(tokenizer, text encoder) pairs of a pipeline: one for SD 1.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def check_prompts(pipe, prompts: list[str], truncate: bool = False) -> None:
    """Raise a ValueError for an empty prompt list, a non-string, or (unless ``truncate``) a prompt
    longer than the tokenizer's limit (CLIP pipelines would silently drop the rest)."""
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt")
    tokenizer = pipe.tokenizer
    limit = tokenizer.model_max_length
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise ValueError(f"prompts must be strings; got {type(prompt).__name__}")
        n = len(tokenizer(prompt, truncation=False).input_ids)
        if n > limit and not truncate:
            raise ValueError(
                f"prompt has {n} tokens, more than the tokenizer's limit of {limit} (start and end "
                f"tokens included): {prompt[:60]!r}...; shorten it, or pass --truncate to keep only "
                f"the first {limit - 2} tokens as the pipeline's text encoder would"
            )


@torch.no_grad()
def encode_prompt_batch(pipe, prompts: list[str]) -> PromptBatch:
    """Tokenize and encode ``prompts`` with the pipeline's last text tower (SDXL: the second, the
    one with a projection). ``pooled`` is the end-of-text state, through the projection if any."""
    tokenizer, encoder = text_towers(pipe)[-1]
    device = next(encoder.parameters()).device
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids.to(device)
    out = encoder(ids, output_hidden_states=False)
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        pooled = out.pooler_output
    return PromptBatch(
        prompts=list(prompts), input_ids=ids, hidden_states=out.last_hidden_state.float(),
        pooled=pooled.float(),
    )
