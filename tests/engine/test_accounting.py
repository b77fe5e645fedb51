"""FAB, weighted bits and BitOPs, checked against counts made by hand."""

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from qlip.methods.calibrate import activation_banks, calibrate_bank, calibrate_weights, observing
from qlip.nn import LayerRule, QuantConfig, quantize_model
from qlip.pipeline import BitLedger, MacCounter


class HandCounted(nn.Module):
    """conv 3→8 (3×3) on 4×4, self-attention over the 16 positions (2 heads × 4), linear 8→4."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = Attention(query_dim=8, heads=2, dim_head=4)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):  # x: [B, 3, 4, 4]
        h = self.conv(x).flatten(2).transpose(1, 2)  # [B, 16, 8]
        return self.lin(self.attn(h))


# MACs per batch element, by hand
CONV = 8 * 16 * (3 * 9)  # out channels × positions × fan-in = 3456
QKV = 16 * 8 * 8  # each of to_q, to_k, to_v: tokens × in × out = 1024
OUT = 16 * 8 * 8  # to_out (kept FP by the rule below)
LIN = 16 * 8 * 4  # 512
QK = PV = 16 * 16 * 8  # tokens × tokens × inner dim = 2048


def _quantized_model():
    torch.manual_seed(0)
    model = HandCounted()
    config = QuantConfig(wbits=4, abits=8, abits_options=(8, 16), softmax_bits=16,
                         rules=(LayerRule("attn.to_out.0", quantize=False),))
    units = quantize_model(model, config)
    calibrate_weights(units)
    with observing(units) as observers:
        model(torch.randn(4, 3, 4, 4))
    for name, bank in activation_banks(units).items():
        calibrate_bank(bank, observers[name])
    return model, units


def _ledger(model, units, batch: int, batch_mode: str = "max") -> BitLedger:
    """A ledger whose sites were counted on one forward pass of ``batch`` elements."""
    ledger = BitLedger(units, list(units), batch_mode)
    with MacCounter(model) as counter:
        model(torch.randn(batch, 3, 4, 4))
    ledger.sites = counter.sites
    return ledger


def _bits(units, **changed) -> torch.Tensor:
    """[U] bits in the ledger's unit order: 8 everywhere except ``changed`` (unit name -> bits)."""
    return torch.tensor([changed.get(n.replace(".", "_"), 8) for n in units])


def test_mac_counter_finds_every_site_with_hand_counted_macs():
    model, units = _quantized_model()
    with MacCounter(model) as counter:
        model(torch.randn(2, 3, 4, 4))
    macs = {s.name: s.macs for s in counter.sites}
    assert macs == {
        "conv": CONV, "attn.to_q": QKV, "attn.to_k": QKV, "attn.to_v": QKV,
        "attn.to_out.0": OUT, "attn.qk": QK, "attn.pv": PV, "lin": LIN,
    }
    fp_sites = [s.name for s in counter.sites if s.unit is None]
    assert fp_sites == ["attn.to_out.0"]


def test_fab_weighted_bits_and_bitops_are_exact():
    model, units = _quantized_model()
    ledger = _ledger(model, units, batch=2)
    ledger.record_step(_bits(units), _bits(units)[None])  # step 1: everything at 8 bits
    ledger.record_step(_bits(units, conv=16), _bits(units, conv=16)[None])  # step 2: conv at 16
    [report] = ledger.reports(["p"], [0], elements_per_image=2)

    layers = 5  # conv, to_q, to_k, to_v, lin (to_out is FP, not a quantized layer)
    assert report.fab == pytest.approx((8 * layers + (16 + 8 * 4)) / (2 * layers))  # 8.8
    layer_macs = CONV + 3 * QKV + LIN
    weighted = (8 * layer_macs + 16 * CONV + 8 * (3 * QKV + LIN)) / (2 * layer_macs)
    assert report.weighted_bits == pytest.approx(weighted)
    step1 = (CONV * 4 * 8 + 3 * QKV * 4 * 8 + LIN * 4 * 8 + OUT * 32 * 32
             + QK * 8 * 8 + PV * 16 * 8)
    step2 = step1 + CONV * 4 * (16 - 8)
    assert report.bitops_t * 1e12 == pytest.approx(2 * (step1 + step2), rel=1e-12)
    assert report.macs_g * 1e9 == pytest.approx(2 * 2 * (layer_macs + OUT + QK + PV))
    assert report.steps == 2


def test_bypass_counts_as_32_bits():
    model, units = _quantized_model()
    ledger = _ledger(model, units, batch=1)
    sixteen = torch.full((len(units),), 16)
    ledger.record_step(sixteen, sixteen[None])
    [report] = ledger.reports(["p"], [0], elements_per_image=1)
    assert report.fab == 16.0


def test_per_image_mode_counts_each_image_at_its_own_bits():
    model, units = _quantized_model()
    ledger = _ledger(model, units, batch=2, batch_mode="per_image")
    requested = torch.stack([_bits(units), _bits(units, conv=16)])  # [images, U]
    ledger.record_step(requested.T, requested)  # per image: run = requested
    first, second = ledger.reports(["a", "b"], [0, 1], elements_per_image=2)
    assert first.fab == first.fab_requested == 8.0
    assert second.fab == second.fab_requested == pytest.approx((16 + 8 * 4) / 5)
    assert (second.bitops_t - first.bitops_t) * 1e12 == pytest.approx(2 * CONV * 4 * (16 - 8))
    assert first.batch_mode == "per_image"


def test_max_mode_runs_at_the_batch_maximum_and_reports_the_request():
    model, units = _quantized_model()
    ledger = _ledger(model, units, batch=2)
    requested = torch.stack([_bits(units), _bits(units, conv=16)])
    ledger.record_step(requested.amax(dim=0), requested)
    first, second = ledger.reports(["a", "b"], [0, 1], elements_per_image=2)
    assert first.fab == second.fab == pytest.approx((16 + 8 * 4) / 5)
    assert first.fab_requested == 8.0 and first.bitops_t == second.bitops_t
