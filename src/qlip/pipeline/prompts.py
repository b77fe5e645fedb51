"""Turning prompts into what bit policies read, with the checks every command makes of them:
text (no control characters, not empty unless asked), and the tokenizer's limit."""

from __future__ import annotations

import unicodedata

import torch

from ..policies import PromptBatch


def text_towers(pipe) -> list[tuple[object, torch.nn.Module]]:
    """(tokenizer, text encoder) pairs of a pipeline: one for SD 1.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


ALLOWED_CONTROLS = "\t\n\r"  # whitespace to the tokenizer


def check_prompt_text(prompt, where: str = "prompt", allow_empty: bool = False) -> None:
    """Refuse a prompt that is not text a text encoder should see: not a string, empty or only
    whitespace (unless ``allow_empty``: an empty prompt means unconditional generation), or
    holding a control character or an unpaired surrogate (bytes that were not UTF-8)."""
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: prompts must be strings; got {type(prompt).__name__}")
    if not prompt.strip() and not allow_empty:
        raise ValueError(f"{where} is empty or only whitespace; give it words, or pass "
                         "--allow-empty-prompt to generate unconditionally (an empty prompt "
                         "means no text conditioning)")
    for position, char in enumerate(prompt):
        kind = unicodedata.category(char)
        if (kind == "Cc" and char not in ALLOWED_CONTROLS) or kind == "Cs":
            what = "an unpaired surrogate (not UTF-8 text)" if kind == "Cs" else \
                "a control character"
            raise ValueError(f"{where} holds {what} U+{ord(char):04X} at character {position}: "
                             f"{prompt[:40]!r}; remove it")


def check_prompts(pipe, prompts: list[str], truncate: bool = False, allow_empty: bool = False
                  ) -> int:
    """Raise a ValueError for an empty prompt list, a prompt :func:`check_prompt_text` refuses,
    or (unless ``truncate``) a prompt longer than the tokenizer's limit (CLIP pipelines would
    silently drop the rest). Returns how many prompts are over the limit (cut, under
    ``truncate``)."""
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt")
    tokenizer = pipe.tokenizer
    limit = tokenizer.model_max_length
    over = 0
    for i, prompt in enumerate(prompts):
        check_prompt_text(prompt, f"prompt {i + 1}", allow_empty)
        n = len(tokenizer(prompt, truncation=False).input_ids)
        if n > limit and not truncate:
            raise ValueError(
                f"prompt {i + 1} has {n} tokens, more than the tokenizer's limit of {limit} (start "
                f"and end tokens included): {prompt[:60]!r}...; shorten it, or pass --truncate to "
                f"keep only the first {limit - 2} tokens as the pipeline's text encoder would"
            )
        over += n > limit
    return over


def prompt_lengths(pipe, prompts: list[str]) -> torch.Tensor:
    """``[n]`` long: each prompt's token count under the pipeline's first tokenizer, start and
    end tokens included, untruncated (QLIP's prompt-length criterion)."""
    tokenizer = text_towers(pipe)[0][0]
    return torch.tensor([len(tokenizer(p, truncation=False).input_ids) for p in prompts])


def truncation_note(over: int, total: int, limit: int) -> str:
    """The line a command prints when ``--truncate`` cut ``over`` of ``total`` prompts."""
    return (f"--truncate: {over} of {total} prompts are longer than the tokenizer's limit of "
            f"{limit} tokens and were cut to their first {limit - 2}")


def text_states(output) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states [B, L, D], pooled [B, P]) of a text encoder's output, the pooled
    end-of-text state through the projection if the encoder has one (``text_embeds``). Also reads
    ``return_dict=False`` tuples: ``(hidden, pooled, ...)``, or ``(text_embeds, hidden, ...)``
    for an encoder with a projection (its first entry is then 2-d)."""
    if isinstance(output, tuple):
        first, second = output[0], output[1]
        return (second, first) if first.ndim == 2 else (first, second)
    pooled = getattr(output, "text_embeds", None)
    return output.last_hidden_state, output.pooler_output if pooled is None else pooled


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
    hidden, pooled = text_states(encoder(ids, output_hidden_states=False))
    return PromptBatch(prompts=list(prompts), input_ids=ids, hidden_states=hidden.float(),
                       pooled=pooled.float())
