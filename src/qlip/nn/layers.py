"""Quantized Linear and Conv2d, made by module swap: cached fake-quantized weights and a bank of
activation quantizers per input part; the active bits are data set from outside (``set_bits``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import (
    UniformQuantizer,
    check_bits,
    fused_quantize,
    is_bypass,
    real_conv,
    real_fp8,
    real_gemm,
)
from ..quant.packing import NIBBLE_BITS, pack_nibbles, unpack_nibbles
from .bank import ActivationBank
from .unit import QuantUnit, fp_bits


class QuantLayer(QuantUnit):
    """Common part of :class:`QuantLinear` and :class:`QuantConv2d`.

    ``splits`` (input-split quantization, Q-Diffusion's shortcut splitting) gives each part of a
    concatenated input its own activation bank and its own weight quantizer over the matching
    input-channel slice of the weight. ``act_groups > 1`` (DGQ) makes the banks grouped, along
    the candidate dims ``group_dims`` of what the bank sees.
    """

    channel_dim: int  # dim of the input's channels
    group_dims: tuple[int, ...]  # DGQ's candidate dims (channel, token) of a bank's input
    fab_member = True
    packed = False  # pack_weights(): 4-bit codes two per byte, no FP weight kept

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        wbits: int,
        abits_options: Sequence[int],
        abits: int,
        splits: Sequence[int] | None = None,
        weight_symmetric: bool = False,
        weight_per_channel: bool = True,
        act_symmetric: bool = False,
        act_steps: int | None = None,
        dynamic: bool = True,
        act_groups: int = 1,
    ):
        options = tuple(sorted({check_bits(b, "activation bits") for b in abits_options}))
        super().__init__(options, abits, dynamic)
        self.weight = base.weight
        self.bias = base.bias
        self.wbits = check_bits(wbits, "weight bits")
        in_ch = self.weight.shape[1]
        self.splits = tuple(splits) if splits else (in_ch,)
        if sum(self.splits) != in_ch:
            raise ValueError(f"input splits {self.splits} do not add up to {in_ch} input channels")
        out_ch = self.weight.shape[0]
        self.weight_quantizers = nn.ModuleList(
            UniformQuantizer(
                wbits,
                symmetric=weight_symmetric,
                channel_dim=0 if weight_per_channel else None,
                num_channels=out_ch,
            )
            for _ in self.splits
        )
        kind = "grouped" if act_groups > 1 else "uniform"
        self.act_groups = act_groups
        self.act_banks = nn.ModuleList(
            ActivationBank(options, kind, symmetric=act_symmetric, num_steps=act_steps,
                           groups=act_groups, dims=self.group_dims)
            for _ in self.splits
        )
        # the dequantized weight, computed once (follows the module's device and dtype)
        self.register_buffer("_qweight", None, persistent=False)

    def activation_banks(self) -> dict[str, ActivationBank]:
        return {f"in{i}": bank for i, bank in enumerate(self.act_banks)}

    def operand_bits(self, site: str, abits: int) -> tuple[int, int]:
        return fp_bits(self.wbits), fp_bits(abits)

    # -- weights -------------------------------------------------------------------------------
    def weight_slices(self) -> list[torch.Tensor]:
        if self.packed:
            raise RuntimeError("this layer's weights are packed (pack_weights: codes only, for "
                               "sampling); load the model without packing to calibrate it")
        return list(torch.split(self.weight, self.splits, dim=1))

    def calibrate_weight(self, method: str = "minmax") -> None:
        """Set each weight quantizer's grid from the weight (per output channel by default) and
        store the rounded integer codes."""
        if is_bypass(self.wbits):
            return
        for quantizer, w in zip(self.weight_quantizers, self.weight_slices()):
            quantizer.calibrate(w.detach(), method)
        with torch.no_grad():
            self.set_weight_codes(
                [q.quantize_codes(w) for q, w in zip(self.weight_quantizers, self.weight_slices())]
            )

    def set_weight_codes(self, codes: list[torch.Tensor]) -> None:
        """Fix the integer weight codes (one tensor per input split); forward dequantizes them."""
        dtype = torch.uint8 if self.wbits <= 8 else torch.int32
        for i, c in enumerate(codes):
            self.register_buffer(f"weight_codes_{i}", c.round().to(dtype))
        self.refresh_weight()

    def weight_codes(self) -> list[torch.Tensor] | None:
        if self.packed:  # (a conv's nibbles tap-major: [N, KH, KW, C], put back as [N, C, KH, KW])
            return [self._from_nibble_order(unpack_nibbles(self._buffers[f"weight_nibbles_{i}"],
                                                           self._to_nibble_order(shape)))
                    for i, shape in enumerate(self._code_shapes)]
        codes = [getattr(self, f"weight_codes_{i}", None) for i in range(len(self.splits))]
        return None if any(c is None for c in codes) else codes

    # -- packed weights (sampling) -----------------------------------------------------------
    def pack_weights(self) -> bool:
        """Keep this layer's weight as its integer codes only, two 4-bit codes per byte, with the
        quantizers' scales and zero points: the FP weight and the dequantized cache are dropped,
        and every forward dequantizes the codes (unpack, subtract the zero point, scale). For
        sampling a loaded model in less memory; a packed layer cannot be calibrated again.
        Returns False, changing nothing, for a layer whose weights are not quantized to at most
        4 bits (W8, or FP weights)."""
        if self.packed:
            return True
        if is_bypass(self.wbits) or self.wbits > NIBBLE_BITS:
            return False
        codes = self.weight_codes()
        if codes is None or any(q.ste for q in self.weight_quantizers):
            raise ValueError("pack_weights() needs the layer's weights fixed to integer codes "
                             "(a calibrated, loaded model); calibrate or load it first")
        for quantizer in self.weight_quantizers:
            quantizer.check_calibrated()
        weight = self._parameters["weight"]
        self._code_shapes = [tuple(c.shape) for c in codes]
        for i, c in enumerate(codes):
            del self._buffers[f"weight_codes_{i}"]
            self.register_buffer(f"weight_nibbles_{i}",
                                 pack_nibbles(self._to_nibble_order(c).to(torch.uint8)))
        self._parameters["weight"] = _placeholder(weight.shape, weight.dtype, weight.device)
        self.packed = True
        self.refresh_weight()  # real execution, if on, now reads the packed bytes
        return True

    # A packed conv's nibbles are tap-major, [N, KH, KW, C] (``real_conv.tap_major_rows``), the
    # order its real kernel reads 16 bytes at a time; the files keep the layer's own order
    # (pipeline.saving writes weight_codes()). Linear layers and 1×1 convs: the same order.
    def _nibbles_tap_major(self) -> bool:
        return self.kind == "conv2d" and tuple(self.kernel_size) != (1, 1)

    def _to_nibble_order(self, value):
        """Codes ``[N, C, KH, KW]`` (or their shape) as the nibbles hold them."""
        if not self._nibbles_tap_major():
            return value
        if isinstance(value, torch.Tensor):
            return value.permute(0, 2, 3, 1)
        n, c, kh, kw = value
        return (n, kh, kw, c)

    def _from_nibble_order(self, codes: torch.Tensor) -> torch.Tensor:
        # (contiguous: a channels-last weight would take other conv algorithms than the
        # unpacked layer's, and give other float roundings)
        return codes.permute(0, 3, 1, 2).contiguous() if self._nibbles_tap_major() else codes

    def _apply(self, fn, recurse: bool = True):
        if not self.packed:
            return super()._apply(fn, recurse)
        # .to()/.half() would materialise the placeholder's full shape: move the rest, then
        # make a new placeholder of the converted dtype and device
        old = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
            probe = fn(torch.empty(0, dtype=old.dtype, device=old.device))
        finally:
            self._parameters["weight"] = old
        self._parameters["weight"] = _placeholder(old.shape, probe.dtype, probe.device)
        return self

    def refresh_weight(self) -> None:
        """Drop the cached quantized weight (call after changing weight quantizers); real
        execution's integer operands are rebuilt from the new codes."""
        self._qweight = None
        if getattr(self, "_real_parts", None) is not None:
            self.use_real(True)

    def refresh(self) -> None:
        super().refresh()
        self.refresh_weight()

    def compute_quantized_weight(self) -> torch.Tensor:
        if is_bypass(self.wbits):
            return self.weight
        codes = self.weight_codes()
        if codes is None or any(q.ste for q in self.weight_quantizers):
            parts = [q(w) for q, w in zip(self.weight_quantizers, self.weight_slices())]
        else:  # a packed layer dequantizes in every forward: checked once, when packed
            parts = [q.dequantize(c, self.weight.dtype, check=not self.packed)
                     for q, c in zip(self.weight_quantizers, codes)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def quantized_weight(self) -> torch.Tensor:
        if self.packed:  # nothing cached: the memory is the point
            return self.compute_quantized_weight()
        cached = self._buffers["_qweight"]  # (read past __getattr__: eager pays per Python step)
        if (cached is not None and not torch.is_grad_enabled()
                and cached.dtype == self._parameters["weight"].dtype):
            return cached  # the inference path, kept short
        # Training through the rounding (AdaRound, STE) needs a fresh graph every call.
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return self.compute_quantized_weight()
        if self._qweight is None or self._qweight.device != self.weight.device:
            with torch.no_grad():
                self._qweight = self.compute_quantized_weight().detach()
        if self._qweight.dtype != self.weight.dtype:
            return self._qweight.to(self.weight.dtype)
        return self._qweight

    # -- activations ---------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        banks = self._modules["act_banks"]._modules  # {"0": bank, ...}, read without __getattr__
        if len(banks) == 1:
            return self.quantize(banks["0"], x)
        parts = torch.split(x, self.splits, dim=self.channel_dim)
        return torch.cat(
            [self.quantize(bank, p) for bank, p in zip(self.act_banks, parts)], dim=self.channel_dim
        )

    def extra_repr(self) -> str:
        split = f", splits={self.splits}" if len(self.splits) > 1 else ""
        return f"w{self.wbits}{self.bits_label()}{split}"

    # -- real execution (eager GPU inference) ---------------------------------------------------
    _real_parts: tuple | None = None  # use_real(): every input part's integer operands

    @property
    def _real(self) -> tuple | None:
        """The first input part's operands of real execution (None: the layer is simulated)."""
        return None if self._real_parts is None else self._real_parts[0]
    # use_real(): per input part, the dequantized weights its float options read
    # (real_gemm.float_weights), or None (every option integer math, or packed codes)
    _real_float: tuple | None = None
    _real_keep_float = True  # use_real(float_weights=...): whether to keep them
    _real_tap_major = False  # use_real(): a conv's codes in _real are tap-major (real_conv)
    _real_integer_only = False  # use_real(): every option in integer math (x never read)
    _real_fp8_wanted = False  # use_real(fp8=...): A8-only GEMM layers in fp8 (qlip.quant.real_fp8)
    _real_fp8 = False  # use_real(): this layer's _real_parts are fp8 operands (w8, scale_b)

    def real_kind(self) -> str | None:
        """How this layer runs for real: ``"gemm"`` (one GEMM over its input's last dim: a
        Linear, a 1×1 conv of stride 1), ``"conv"`` (an implicit GEMM: any other conv), or None."""
        return "gemm"

    def use_real(self, on: bool = True, float_weights: bool | None = None,
                 fp8: bool | None = None) -> bool:
        """Run this layer for real (:mod:`qlip.quant.real_gemm`): integer math at options of at
        most 8 bits, float math above, chosen on the device, in eager inference on the GPU.
        Needs a layer of a :meth:`real_kind` (a Linear, a conv), weights of at most 8 bits fixed
        to codes and per-tensor uniform banks; returns False, changing nothing, for a layer that
        has not. A layer of several input parts (Q-Diffusion's shortcut splitting: each part its
        own activation grid and weight grid) runs one product per part and adds them. Eager and
        compiled (the kernels are custom operators that ``torch.compile`` keeps in its graph);
        elsewhere (a per-image choice, gradients, the CPU) the simulation runs.

        ``float_weights`` (kept for later rebuilds where None; default True): a layer with
        float options beside its integer ones keeps its dequantized weights for them
        (:func:`qlip.quant.real_gemm.float_weights`, 2 bytes a bf16 weight), which its float
        math then reads instead of dequantizing the codes in every tile; False saves that memory.

        ``fp8`` (kept for later rebuilds where None; default False): a one-GEMM layer (a Linear,
        a 1×1 conv) whose every option is A8, with weights of at most 4 bits and one input part,
        runs through ``torch._scaled_mm`` in e4m3 (:mod:`qlip.quant.real_fp8`): the weights
        exact, the activations an fp8 quantizer over the A8 grid's range, not the integer
        simulation's values; on the CPU too. Other layers keep the integer kernels."""
        if float_weights is not None:
            self._real_keep_float = bool(float_weights)
        if fp8 is not None:
            self._real_fp8_wanted = bool(fp8)
        self._real_fp8 = False
        if not on:
            self._real_parts = self._real_float = None
            return True
        codes = self.weight_codes()
        banks = [self.act_banks[i] for i in range(len(self.splits))]
        if (self.real_kind() is None or is_bypass(self.wbits) or self.wbits > 8
                or codes is None or any(bank.kind != "uniform" for bank in banks)
                or self.weight[0].numel() > real_gemm.MAX_K):
            return False
        integer, offset = real_gemm.int8_offsets(self.options)
        self._real_integer_only = bool(integer.all())  # (a CPU tensor here, not a forward)
        # an implicit-GEMM conv's codes tap-major: each tap's channels contiguous (int8: a copy
        # made here; packed: the layer's own bytes, kept tap-major by pack_weights)
        self._real_tap_major = self.real_kind() == "conv" and (
            not self.packed or self._nibbles_tap_major())
        if self._real_fp8_wanted and self._use_fp8(codes, integer, offset):
            return True
        parts, floats = [], []
        for index, part in enumerate(codes):
            part = part.flatten(1)  # [N, K]: a conv's K is C·KH·KW, in its weight's order
            scale, zero = self.weight_quantizers[index].params()
            weights = real_gemm.weight_operands(part, scale, zero, self.wbits,
                                                packed=self._packed_rows(part, index))
            if self._real_tap_major and not self.packed:
                weights = (real_conv.tap_major_rows(weights[0], self.kernel_size), *weights[1:])
            parts.append(tuple(None if t is None else t.to(self.weight.device)
                               for t in (integer, offset, *weights)))
            # a float option (QLIP's A16 beside A8) reads its weights dequantized once, here,
            # not in every tile; packed codes keep no such copy
            w, _, w_zero, w_scale = parts[-1][2:]
            floats.append(None if self._real_integer_only or self.packed
                          or not self._real_keep_float else
                          real_gemm.float_weights(w, w_zero, w_scale, self.weight.dtype))
        self._real_parts, self._real_float = tuple(parts), tuple(floats)
        self._qweight = None  # the simulation's dequantized weight, rebuilt if it runs again
        return True

    def _use_fp8(self, codes, integer: torch.Tensor, offset: torch.Tensor) -> bool:
        """Make this layer's real operands fp8 ones (:func:`qlip.quant.real_fp8.fp8_weights`)
        where it can take them: one GEMM, one input part, every option A8 (integer math, offset
        128), weights whose centered codes are exact in e4m3. A packed layer's operands are its
        own bytes, unpacked to e4m3 at every call (no second copy of the weights). Returns
        whether it did."""
        if (self.real_kind() != "gemm" or len(codes) != 1
                or not bool(integer.all()) or not bool((offset == 128).all())):
            return False
        scale, zero = self.weight_quantizers[0].params()
        rows = codes[0].flatten(1)
        w, _, w_zero, w_scale = real_gemm.weight_operands(rows, scale, zero, self.wbits,
                                                          packed=self._packed_rows(rows))
        operands = real_fp8.fp8_weights(w, w_zero, w_scale, k=rows.shape[1])
        if operands is None:
            return False
        self._real_parts = (tuple(None if t is None else t.to(self.weight.device)
                                  for t in operands),)
        self._real_float, self._real_fp8 = (None,), True
        self._qweight = None
        return True

    def _fp8_gemm(self, x, *args) -> torch.Tensor:
        """An fp8 layer's GEMM over x's last dim (:func:`qlip.quant.real_fp8.fp8_linear`)."""
        return real_fp8.fp8_linear(x, *args)

    def _packed_rows(self, codes: torch.Tensor, index: int = 0) -> torch.Tensor | None:
        """A packed layer's codes of input part ``index`` as real execution reads them,
        ``[N, ceil(K/2)]`` bytes (a conv's tap-major): its own packed buffer viewed by rows where
        K is even (no copy), packed again by rows where K is odd; None for a layer that is not
        packed."""
        if not self.packed:
            return None
        out_features, k = codes.shape
        if k % 2 == 0:
            return self._buffers[f"weight_nibbles_{index}"].view(out_features, k // 2)
        if self._nibbles_tap_major():
            codes = real_conv.tap_major_rows(codes, self.kernel_size)
        return real_gemm.pack_rows(codes)

    def _real_forward(self, x: torch.Tensor, run=None) -> torch.Tensor | None:
        """``x`` through ``run`` (default :func:`qlip.quant.real_gemm.real_linear`, ``x [..., K]``)
        with this layer's option, step and operands, or None where the simulation must run.
        With several input parts, each part's product (its own grid and weights) is added; the
        bias once."""
        parts = self._real_parts
        if parts is None or torch.is_grad_enabled():
            return None
        banks = self._modules["act_banks"]._modules
        table = self._table
        choice = self._buffers["_choice"] if table is None else table[self._row]
        fp8 = self._real_fp8  # (torch's own op: no Triton needed, the CPU too)
        if (choice.shape != (1,) or choice.is_floating_point()
                or not (fp8 or fused_quantize.available(x))
                or any(bank.observer is not None or not bank.enabled for bank in banks.values())):
            return None
        if parts[0][0].device != x.device:  # moved since use_real(): rebuild from the moved
            # buffers (a copy would keep a second set of codes: a packed layer reads its own bytes)
            self.use_real(True)
            parts = self._real_parts
            if parts[0][0].device != x.device:  # the layer is elsewhere: the simulation says so
                return None
        step = self._shared_step if self._shared_step is not None else self._buffers["_step"]
        if fp8:
            stack = banks["0"]._modules["stack"]
            return self._fp8_gemm(x, stack._flat_table(x.dtype), choice, step,
                                  stack.num_steps or 0, *parts[0], self._parameters.get("bias"))
        if run is None:  # (not `run or ...`: torch 2.11's Dynamo cannot take a bound method's
            run = real_gemm.real_linear  # truth value and broke the graph at every real conv)
        bias = self._parameters.get("bias")
        only = self._real_integer_only
        floats = self._real_float
        if floats[0] is not None and floats[0].dtype != x.dtype:  # (kept in the layer's dtype:
            floats = (None,) * len(floats)  # an input of another dtype dequantizes in the tiles)
        if len(self.splits) == 1:
            stack = banks["0"]._modules["stack"]
            return run(x, stack._flat_table(x.dtype), choice, step, stack.num_steps or 0,
                       *parts[0], bias, integer_only=only, w_float=floats[0])
        out, start = None, 0
        for index, (size, operands, w_float) in enumerate(zip(self.splits, parts, floats)):
            stack = banks[str(index)]._modules["stack"]
            part = run(x.narrow(self.channel_dim, start, size), stack._flat_table(x.dtype),
                       choice, step, stack.num_steps or 0, *operands, bias if index == 0 else None,
                       integer_only=only, w_float=w_float)
            out, start = part if out is None else out + part, start + size
        return out


def _placeholder(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """A packed layer's ``weight``: the FP weight's shape, dtype and device on one element of
    storage (a zero-stride view), so that what reads ``layer.weight.shape``/``.dtype`` and a
    model's ``.device`` keeps working while the weight's memory is freed."""
    return nn.Parameter(torch.zeros(1, dtype=dtype, device=device).expand(shape),
                        requires_grad=False)


class QuantLinear(QuantLayer):
    channel_dim = -1
    group_dims = (-1, -2)  # x: [B, N, C] -> channel C, token N (a [B, C] input: channel only)
    kind = "linear"

    # what callers read off an nn.Linear (SDXL's pipeline reads add_embedding.linear_1.in_features)
    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., C_in]
        if self._real_parts is not None:
            real = self._real_forward(x)
            if real is not None:
                return real
        return F.linear(self.quantize_input(x), self.quantized_weight(),
                        self._parameters.get("bias"))  # (None: a layer without bias)


class QuantConv2d(QuantLayer):
    """With grouped activations (DGQ) the conv runs as unfold + matmul, and the banks quantize
    the unfolded input ``[B, C_in·kh·kw, L]``: its candidate dims are the unfolded channel and
    the output position, as in DGQ's code. Full-precision passes take the plain conv."""

    channel_dim = 1
    group_dims = (-2, -1)  # unfolded x: [B, C·kh·kw, L] -> unfolded channel, position
    kind = "conv2d"

    def __init__(self, base: nn.Conv2d, *args, **kwargs):
        super().__init__(base, *args, **kwargs)
        if base.padding_mode != "zeros":
            raise ValueError(f"padding_mode {base.padding_mode!r} is not supported; only 'zeros'")
        self.stride, self.padding = base.stride, base.padding
        self.dilation, self.groups = base.dilation, base.groups
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self.kernel_size, self.padding_mode = base.kernel_size, base.padding_mode
        if self.groups != 1 and len(self.splits) > 1:
            raise ValueError("input splits need a conv with groups=1")
        if self.groups != 1 and self.act_groups > 1:
            raise ValueError("grouped activations (DGQ) run a conv as unfold + matmul, which "
                             "needs groups=1; keep this conv out with a LayerRule")
        if isinstance(self.padding, str) and self.act_groups > 1:
            raise ValueError(f"grouped activations (DGQ) unfold the conv's input, which needs the "
                             f"padding in pixels; got padding={self.padding!r}")

    def _real_padding(self) -> tuple[int, int] | None:
        if self.padding == "valid":
            return (0, 0)
        return tuple(self.padding) if not isinstance(self.padding, str) else None

    def real_kind(self) -> str | None:
        if self.dilation != (1, 1) or self.groups != 1 or self._real_padding() is None:
            return None
        if self.kernel_size == (1, 1) and self._real_padding() == (0, 0) and self.stride == (1, 1):
            return "gemm"
        return "conv"  # (any stride: the downsamplers' 3×3 convs of stride 2 too)

    # The real kernels read x as NHWC. Asked for here, in the graph, a channels-first input's
    # layout change is a copy in eager (as the kernel's operator would make), and under
    # torch.compile a layout Inductor gives the kernel that produces x, with no copy of its own.
    def _run_real_conv(self, x, *args, integer_only: bool = False, w_float=None):
        return real_conv.real_conv2d(x.contiguous(memory_format=torch.channels_last), *args,
                                     kernel_size=self.kernel_size, padding=self._real_padding(),
                                     tap_major=self._real_tap_major, stride=self.stride,
                                     integer_only=integer_only, w_float=w_float)

    def _run_real_gemm(self, x, *args, integer_only: bool = False, w_float=None):  # one GEMM
        # over the channels of x seen as [B, H, W, C]
        x = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return real_gemm.real_linear(x, *args, integer_only=integer_only,
                                     w_float=w_float).permute(0, 3, 1, 2)

    def _fp8_gemm(self, x, *args) -> torch.Tensor:  # over the channels of x as [B, H, W, C]
        x = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return real_fp8.fp8_linear(x, *args).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C_in, H, W]
        if self._real_parts is not None:
            run = self._run_real_gemm if self.real_kind() == "gemm" else self._run_real_conv
            real = self._real_forward(x, run)
            if real is not None:
                return real  # [B, C_out, H, W], channels-last in memory
        if self.act_groups > 1 and not self.act_banks[0].passes_through():
            return self._unfolded_forward(x)
        return F.conv2d(
            self.quantize_input(x),
            self.quantized_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def _unfolded_forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, dim=1) if len(self.splits) > 1 else (x,)
        columns = [self.quantize(bank, F.unfold(p, self.kernel_size, self.dilation, self.padding,
                                                self.stride))
                   for bank, p in zip(self.act_banks, parts)]  # each [B, c_i·kh·kw, L]
        # F.unfold orders (channel, kh, kw) channel-major, as the weight's flatten(1) does
        cols = columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)
        out = self.quantized_weight().flatten(1) @ cols  # [B, C_out, L]
        if self.bias is not None:
            out = out + self.bias[:, None]
        size = [(x.shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1)
                 - 1) // self.stride[i] + 1 for i in range(2)]
        return out.unflatten(2, size)

    def weight_slices(self) -> list[torch.Tensor]:
        if self.groups != 1 and not self.packed:
            return [self.weight]
        return super().weight_slices()
