"""Attention processor that quantizes q, k, v and the attention probabilities (materialised softmax)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..quant import check_bits
from ..quant import fused_attention as fused
from .bank import ActivationBank
from .unit import QuantUnit, fp_bits

PROB_QUANTIZERS = ("uniform", "log2")


class QuantAttnProcessor(QuantUnit):
    """Drop-in diffusers attention processor (self- and cross-attention; works on the pipeline's
    classifier-free-guidance batch, as every operation is per sample).

    q, k, v are quantized after the head reshape at the unit's active bits (a bank each, like a
    layer's input; grouped along head-dim channel or token with ``act_groups > 1``, DGQ); the
    softmax output at ``prob_bits``, or at the unit's active bits with ``prob_follows_abits``
    (DGQ's code: softmax bits = activation bits), with a uniform or log2 quantizer (log2: in
    self- and cross-attention, as DGQ's code). With ``keep_start_token`` (DGQ), in
    cross-attention the first key and the first key's column of the probabilities stay in full
    precision and out of the quantizers' ranges (the log2 scale is the max of the other columns).

    ``fused`` (:func:`qlip.nn.use_fused_attention`) computes softmax·V without the
    ``[B·heads, N, M]`` probability tensor (:mod:`qlip.quant.fused_attention`: a Triton kernel on
    CUDA, the same two passes in PyTorch elsewhere) when it can: inference (no gradients), no
    attention mask, a per-tensor probability quantizer, a hard bit choice. Otherwise, and during
    calibration, the probabilities are materialised. ``None`` (the default) fuses where the
    Triton kernel runs (a CUDA tensor, Triton installed): on an H100 it took the compiled SD 1.4
    step at batch 8 from 44.28 to 29.30 ms (twenty-first session); ``True`` fuses everywhere
    (the PyTorch passes on the CPU), ``False`` never.
    """

    fused: bool | None = None

    kind = "attention"

    def __init__(
        self,
        abits_options: Sequence[int],
        abits: int,
        prob_bits: int = 16,
        prob_quantizer: str = "uniform",
        keep_start_token: bool = False,
        act_symmetric: bool = False,
        act_steps: int | None = None,
        dynamic: bool = True,
        act_groups: int = 1,
        prob_follows_abits: bool = False,
    ):
        if prob_quantizer not in PROB_QUANTIZERS:
            raise ValueError(f"prob_quantizer must be one of {PROB_QUANTIZERS}; got {prob_quantizer!r}")
        options = tuple(sorted({check_bits(b, "activation bits") for b in abits_options}))
        super().__init__(options, abits, dynamic)
        kind = "grouped" if act_groups > 1 else "uniform"

        def bank() -> ActivationBank:  # q, k, v: [B·heads, N, d] -> head-dim channel, token
            return ActivationBank(options, kind, symmetric=act_symmetric, num_steps=act_steps,
                                  groups=act_groups, dims=(-1, -2))

        self.q_bank, self.k_bank, self.v_bank = bank(), bank(), bank()
        self.prob_bits = check_bits(prob_bits, "softmax bits")
        self.prob_follows_abits = prob_follows_abits
        prob_options = options if prob_follows_abits else (self.prob_bits,)
        prob_steps = act_steps if prob_follows_abits and prob_quantizer == "uniform" else None
        self.prob_bank = ActivationBank(prob_options, kind=prob_quantizer, num_steps=prob_steps)
        self.register_buffer("_prob_choice", torch.zeros(1, dtype=torch.long), persistent=False)
        self.prob_quantizer = prob_quantizer
        self.keep_start_token = keep_start_token

    def use_fused(self, on: bool | None = True) -> bool:
        self.fused = on
        return True

    def activation_banks(self) -> dict[str, ActivationBank]:
        return {"q": self.q_bank, "k": self.k_bank, "v": self.v_bank, "probs": self.prob_bank}

    def dynamic_banks(self) -> list[ActivationBank]:
        return [self.q_bank, self.k_bank, self.v_bank]

    def operand_bits(self, site: str, abits: int) -> tuple[int, int]:
        if site == "attn_qk" or self.prob_follows_abits:
            return fp_bits(abits), fp_bits(abits)
        return fp_bits(self.prob_bits), fp_bits(abits)  # attn_pv: probabilities × values

    def _keep_first(self, x: torch.Tensor, dim: int, quantize) -> torch.Tensor:
        first, rest = x.narrow(dim, 0, 1), x.narrow(dim, 1, x.shape[dim] - 1)
        return torch.cat([first, quantize(rest)], dim=dim)

    def _probs(self, probs: torch.Tensor, heads: int) -> torch.Tensor:
        # laid out like q, k, v, so that a log2 Δ is the max of the whole tensor (DGQ) when the
        # batch runs at one choice and each image's max per image; the bank has one option, or
        # the unit's options and follows its choice
        choice = self.choice() if self.prob_follows_abits else self._prob_choice.expand(
            self.images())
        return self.prob_bank.forward(probs, choice, heads, self.step_index())

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
        batch_shape = hidden_states.shape
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
        heads = attn.heads
        query = self.quantize(self.q_bank, query, heads)
        if keep_first:
            key = self._keep_first(key, 1, lambda k: self.quantize(self.k_bank, k, heads))
        else:
            key = self.quantize(self.k_bank, key, heads)
        value = self.quantize(self.v_bank, value, heads)

        out = self._fused(attn, query, key, value, attention_mask, keep_first, heads)
        if out is not None:
            return self._finish(attn, out, residual, input_ndim, batch_shape)
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, N, M]
        if keep_first:
            probs = self._keep_first(probs, 2, lambda p: self._probs(p, heads))
        else:
            probs = self._probs(probs, heads)
        return self._finish(attn, torch.bmm(probs, value), residual, input_ndim, batch_shape)

    def _finish(self, attn, out, residual, input_ndim, batch_shape) -> torch.Tensor:
        hidden_states = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(out)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _fused(self, attn, query, key, value, attention_mask, keep_first, heads):
        """softmax·V through :func:`qlip.quant.fused_attention.fused_attention`, or None where
        it does not apply (see the class doc). The conditions read Python state only."""
        bank = self.prob_bank
        choice = self.choice() if self.prob_follows_abits else self._prob_choice
        wanted = fused.available(query) if self.fused is None else self.fused
        if (not wanted or attention_mask is not None or torch.is_grad_enabled()
                or bank.observer is not None or choice.is_floating_point()):
            return None
        stack = bank.stack
        if not bank.enabled:  # a full-precision pass: every row bypassed
            def params_for(row_max):
                return row_max.new_tensor([1.0, 0.0, 0.0, 1.0]).expand(row_max.shape[0], 4)
        else:
            if not self.prob_follows_abits:
                choice = choice.expand(self.images())
            step = self.step_index()

            def params_for(row_max):
                return stack.row_params(choice, heads, step, row_max)
        mode = fused.LOG2 if self.prob_quantizer == "log2" else fused.UNIFORM
        try:
            return fused.fused_attention(query, key, value, attn.scale, params_for, mode,
                                         keep_first)
        except NotImplementedError:  # e.g. a grouped probability grid: materialise
            return None

    def extra_repr(self) -> str:
        start = ", keep_start_token" if self.keep_start_token else ""
        bits = "=abits" if self.prob_follows_abits else self.prob_bits
        return f"{self.bits_label()}, probs={self.prob_quantizer}{bits}{start}"
