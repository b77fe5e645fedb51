"""Attention processor that quantizes q, k, v and the attention probabilities (materialised softmax)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..quant import check_bits
from .bank import ActivationBank, QuantizerFactory, log2_factory, uniform_factory

PROB_QUANTIZERS = ("uniform", "log2")


class QuantAttnProcessor(nn.Module):
    """Drop-in diffusers attention processor (self- and cross-attention; works on the pipeline's
    classifier-free-guidance batch, as every operation is per sample).

    q, k, v are quantized after the head reshape at the active ``abits`` (a bank, like a layer's
    input); the softmax output at ``prob_bits`` with a uniform or log2 quantizer. With
    ``keep_start_token`` (DGQ), in cross-attention the first key and the first key's column of the
    probabilities stay in full precision and out of the quantizers' ranges.
    """

    kind = "attention"

    def __init__(
        self,
        abits_options: Sequence[int],
        abits: int,
        prob_bits: int = 16,
        prob_quantizer: str = "uniform",
        keep_start_token: bool = False,
        act_factory: QuantizerFactory | None = None,
        dynamic: bool = True,
    ):
        super().__init__()
        if prob_quantizer not in PROB_QUANTIZERS:
            raise ValueError(f"prob_quantizer must be one of {PROB_QUANTIZERS}; got {prob_quantizer!r}")
        factory = act_factory or uniform_factory()
        self.q_bank = ActivationBank(abits_options, factory)
        self.k_bank = ActivationBank(abits_options, factory)
        self.v_bank = ActivationBank(abits_options, factory)
        prob_factory = log2_factory() if prob_quantizer == "log2" else uniform_factory()
        self.prob_bits = check_bits(prob_bits, "softmax bits")
        self.prob_bank = ActivationBank((self.prob_bits,), prob_factory)
        self.prob_quantizer = prob_quantizer
        self.abits = check_bits(abits, "activation bits")
        self.keep_start_token = keep_start_token
        self.dynamic = dynamic

    @property
    def banks(self) -> dict[str, ActivationBank]:
        return {"q": self.q_bank, "k": self.k_bank, "v": self.v_bank, "probs": self.prob_bank}

    def set_step(self, step: int) -> None:
        for bank in self.banks.values():
            bank.set_step(step)

    def _keep_first(self, x: torch.Tensor, dim: int, quantize) -> torch.Tensor:
        first, rest = x.narrow(dim, 0, 1), x.narrow(dim, 1, x.shape[dim] - 1)
        return torch.cat([first, quantize(rest)], dim=dim)

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq_len, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        # q: [B*heads, N, d]; k, v: [B*heads, M, d]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        keep_first = self.keep_start_token and is_cross
        query = self.q_bank(query, self.abits)
        if keep_first:
            key = self._keep_first(key, 1, lambda k: self.k_bank(k, self.abits))
        else:
            key = self.k_bank(key, self.abits)
        value = self.v_bank(value, self.abits)

        probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, N, M]
        if keep_first:
            probs = self._keep_first(probs, 2, lambda p: self.prob_bank(p, self.prob_bits))
        else:
            probs = self.prob_bank(probs, self.prob_bits)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def extra_repr(self) -> str:
        start = ", keep_start_token" if self.keep_start_token else ""
        return (
            f"a{self.abits}, options={self.q_bank.options}, "
            f"probs={self.prob_quantizer}{self.prob_bits}{start}"
        )
