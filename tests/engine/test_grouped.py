"""DGQ's grouped quantizers: planted outliers get their own group, the spread rule picks the
dimension, grouped beats per-tensor, the two-dim table gives exactly each group's grid, the conv
runs as unfold + matmul, log2 probabilities with the start token kept, BitOPs."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from qlip.methods.dgq import DGQConfig, calibrate_bank_dgq
from qlip.nn import LayerRule, QuantConfig, quantize_model
from qlip.pipeline import BitLedger, MacCounter
from qlip.quant import (
    GroupRangeObserver,
    GroupStats,
    StackedGrouped,
    choose_dimension,
    kmeans_groups,
    spread,
)
from qlip.quant.ranges import affine_params, fake_quant

from ..conftest import snr_db
from .test_accounting import CONV, LIN, OUT, PV, QK, QKV, HandCounted

STEP0 = torch.zeros(1, dtype=torch.long)


def _observed(x: torch.Tensor, dims=(-1, -2), batches: int = 2) -> GroupStats:
    observer = GroupRangeObserver(dims)
    for part in x.chunk(batches):
        observer(part, 0)
    return observer.stats(0)


def _planted(channel: bool, seed: int = 0) -> torch.Tensor:
    """[B=16, N=32 tokens, C=24 channels] Gaussian with channel 5 (or token 7) scaled ×30."""
    x = torch.randn(16, 32, 24, generator=torch.Generator().manual_seed(seed))
    if channel:
        x[..., 5] *= 30
    else:
        x[:, 7] *= 30
    return x


def test_kmeans_puts_a_planted_outlier_channel_and_token_in_their_own_group():
    for channel, dim, outlier in ((True, -1, 5), (False, -2, 7)):
        x = _planted(channel)
        stats = _observed(x)
        # per-batch mins and maxes, folded: the min of mins is the min over every batch
        assert torch.equal(stats.mins[0], x.amin(dim=(0, 1)))
        assert torch.equal(stats.maxs[1], x.amax(dim=(0, 2)))
        pick = choose_dimension(stats)
        assert stats.dims[pick] == dim
        labels, low, high = kmeans_groups(stats.mins[pick], stats.maxs[pick], groups=8)
        assert int((labels == labels[outlier]).sum()) == 1, (channel, labels)
        mine = int(labels[outlier])
        assert low[mine] == stats.mins[pick][outlier] and high[mine] == stats.maxs[pick][outlier]
        others = labels != labels[outlier]
        assert float(high[labels[others]].max()) < 0.2 * float(high[mine])


def _grouped(x_calib: torch.Tensor, groups: int, options=(4, 8)) -> StackedGrouped:
    stats = _observed(x_calib)
    pick = choose_dimension(stats)
    labels, low, high = kmeans_groups(stats.mins[pick], stats.maxs[pick], groups)
    q = StackedGrouped(options, groups, dims=(-1, -2), num_steps=1)
    q.set_groups(0, stats.sizes, pick, labels, low, high)
    return q


def test_grouped_beats_per_tensor_on_planted_outliers_by_a_stated_margin():
    # measured (channel / token outlier): whole tensor, 4 bits: per tensor 14.4 / 12.5 dB,
    # 8 groups 19.1 / 17.1; 8 bits: 30.2 / 27.1 against 41.5 / 41.1; the ordinary entries at
    # 4 bits: 0.0 / 0.0 (all rounded to zero) against 17.8 / 17.9
    for channel in (True, False):
        calib, held_out = _planted(channel, seed=1), _planted(channel, seed=2)
        ordinary = torch.ones_like(held_out, dtype=torch.bool)
        ordinary[..., 5] = ordinary[..., 5] & ~channel
        ordinary[:, 7] = ordinary[:, 7] & channel
        per_tensor, grouped = _grouped(calib, 1), _grouped(calib, 8)
        gains = {}
        for slot, bits in ((0, 4), (1, 8)):
            one = per_tensor(held_out, torch.tensor(slot), step=STEP0)
            eight = grouped(held_out, torch.tensor(slot), step=STEP0)
            gains[bits] = snr_db(held_out, eight) - snr_db(held_out, one)
            if bits == 4:
                gains["ordinary"] = (snr_db(held_out[ordinary], eight[ordinary])
                                     - snr_db(held_out[ordinary], one[ordinary]))
        assert gains[4] > 4 and gains[8] > 10 and gains["ordinary"] > 15, (channel, gains)


def test_dimension_choice_follows_the_spread_rule():
    def stats(channel, token):
        return GroupStats((-1, -2), [torch.tensor(channel[0]), torch.tensor(token[0])],
                          [torch.tensor(channel[1]), torch.tensor(token[1])], torch.tensor(-2.0),
                          torch.tensor(3.0))

    # channel: maxes spread 2, mins spread 0 -> 2; token: maxes 1, mins 1.5 -> 2.5: the token
    # dim wins although its maxes spread less (both terms count)
    s = stats(channel=([0.0, 0.0], [1.0, 3.0]), token=([-1.5, 0.0], [1.0, 2.0]))
    assert spread(s.mins[0], s.maxs[0]) == 2.0 and spread(s.mins[1], s.maxs[1]) == 2.5
    assert choose_dimension(s) == 1
    s = stats(channel=([-3.0, 0.0], [1.0, 3.0]), token=([-1.5, 0.0], [1.0, 2.0]))  # 5 vs 2.5
    assert choose_dimension(s) == 0
    s = stats(channel=([0.0, 0.0], [1.0, 2.0]), token=([0.0, 0.0], [1.0, 2.0]))  # a tie
    assert choose_dimension(s) == 0  # goes to the channel dim
    # and on data: a [B, C] input has no token dim (it would be the batch dim)
    assert _observed(torch.randn(8, 5), dims=(-1, -2)).dims == (-1,)


def test_each_index_gets_exactly_its_groups_grid_at_every_step_option_and_image():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 5, generator=g) * torch.rand(1, 6, 5, generator=g) * 10  # [B, N, C]
    q = StackedGrouped((4, 8, 32), groups=3, dims=(-1, -2), num_steps=2)
    chan = torch.tensor([0, 2, 1, 1, 0])
    tok = torch.tensor([1, 1, 0, 2, 2, 0])
    lows, highs = torch.tensor([-1.0, -8.0, -20.0]), torch.tensor([2.0, 9.0, 30.0])
    q.set_groups(0, (5, 6), 0, chan, lows, highs)  # step 0: channel groups
    q.set_groups(1, (5, 6), 1, tok, lows / 2, highs / 2)  # step 1: token groups
    for step, index, dim, scale in ((0, chan, -1, 1.0), (1, tok, -2, 0.5)):
        for slot, bits in enumerate((4, 8)):
            s, z = affine_params(lows * scale, highs * scale, bits, False, include_zero=False)
            shape = [1, 1, 1]
            shape[dim] = -1
            ref = fake_quant(x, s[index].reshape(shape), z[index].reshape(shape), bits)
            got = q(x, torch.tensor(slot), step=STEP0 + step)
            assert torch.equal(got, ref), (step, bits)
        assert torch.equal(q(x, torch.tensor(2), step=STEP0 + step), x)  # 32 = bypass
    # per image: rows [copies=2, images=2]; image 0 at 4 bits, image 1 at 8
    both = q(x, torch.tensor([0, 1]), step=STEP0).unflatten(0, (2, 2))
    for image in (0, 1):
        alone = q(x, torch.tensor(image), step=STEP0).unflatten(0, (2, 2))
        assert torch.equal(both[:, image], alone[:, image])



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_whole_batch_path_combines_both_dims_tables_bit_for_bit(dtype):
    """The whole batch at one option divides once by the product of the two dims' Δ and clamps
    once to the max/min of their bounds (one dim's entries are neutral): the same values, in
    every float type, as the per-image path's one division and clamp per dim, and as the
    straight-through path that training takes."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 6, 5, generator=g) * torch.rand(1, 6, 5, generator=g) * 10).to(dtype)
    q = StackedGrouped((4, 8), groups=3, dims=(-1, -2), num_steps=2)
    lows, highs = torch.tensor([-1.0, -8.0, -20.0]), torch.tensor([2.0, 9.0, 30.0])
    q.set_groups(0, (5, 6), 0, torch.tensor([0, 2, 1, 1, 0]), lows, highs)
    q.set_groups(1, (5, 6), 1, torch.tensor([1, 1, 0, 2, 2, 0]), lows / 3, highs / 3)
    for step in (0, 1):
        for slot in (0, 1):
            whole = q(x, torch.tensor(slot), step=STEP0 + step)
            per_image = q(x, torch.tensor([slot, slot]), step=STEP0 + step)  # [copies, n] split
            assert whole.dtype == dtype and torch.equal(whole, per_image), (step, slot)
            leaf = x.clone().requires_grad_(True)
            with torch.enable_grad():
                ste = q(leaf, torch.tensor(slot), step=STEP0 + step)
            assert torch.equal(ste.detach(), whole)
            assert not torch.equal(whole, x)  # a quantizer that changed nothing would pass too

def _calibrated(model, units, x):
    for unit in units.values():
        unit.calibrate_weight()
    banks = {f"{n}.{p}": b for n, u in units.items() for p, b in u.activation_banks().items()}
    observers = {n: GroupRangeObserver(b.dims) for n, b in banks.items()}
    for name, bank in banks.items():
        bank.observer = observers[name]
    with torch.no_grad():
        model(x)
    for name, bank in banks.items():
        bank.observer = None
        if observers[name].steps:
            calibrate_bank_dgq(bank, observers[name], DGQConfig())
    for unit in units.values():
        unit.refresh()


def test_grouped_conv_is_unfold_then_groups_then_matmul():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    config = QuantConfig(wbits=8, abits=4, act_groups=4, act_steps=1)
    units = quantize_model(nn.Sequential(conv), config, {"0": (2, 2)})  # a shortcut split
    layer = units["0"]
    x = torch.randn(3, 4, 7, 7)
    x[:, 1] *= 20  # an outlier channel
    _calibrated(nn.Sequential(layer), units, x)
    with torch.no_grad():
        got = layer(x)
        parts = []  # by hand, from the saved state: each part's own groups along its chosen dim
        for bank, part in zip(layer.act_banks, x.split(2, dim=1)):
            cols = F.unfold(part, 3, padding=1, stride=2)  # [B, 2·9, L]
            stack = bank.stack
            dim = int(stack.candidate_dims[stack.chosen_dim[0]])
            index = getattr(stack, f"group_index_{int(stack.chosen_dim[0])}")[0].long()
            shape = [1, 1, 1]
            shape[dim] = -1
            scale, zero = stack.scale[0, 0][index].reshape(shape), stack.zero_point[0, 0][index]
            parts.append(fake_quant(cols, scale, zero.reshape(shape), 4))
        ref = layer.quantized_weight().flatten(1) @ torch.cat(parts, dim=1) + conv.bias[:, None]
        assert torch.allclose(got, ref.unflatten(2, (4, 4)), atol=1e-5)
        assert [b.stack.sizes.tolist() for b in layer.act_banks] == [[18, 16], [18, 16]]
        for bank in layer.act_banks:  # full-precision passes take the plain conv
            bank.enabled = False
        plain = F.conv2d(x, layer.quantized_weight(), conv.bias, 2, 1)
        assert torch.equal(layer(x), plain)
        assert snr_db(plain, got) > 10


def _attention(kind: str):
    """One head, 4 tokens of dim 4, q/k/v at 32 bits (bypassed), identity v and output, and
    get_attention_scores returning fixed probabilities: the output is the quantized probs."""
    attn = Attention(query_dim=4, cross_attention_dim=4, heads=1, dim_head=4, out_bias=True)
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            lin.weight.copy_(torch.eye(4))
        attn.to_out[0].bias.zero_()
    probs = torch.tensor([[[0.5, 0.3, 0.15, 0.05]] * 4])  # [B·heads=1, N=4, M=4]
    attn.get_attention_scores = lambda q, k, mask=None: probs
    config = QuantConfig(wbits=32, abits=32, softmax_bits=2, softmax_quantizer="log2",
                         keep_start_token=True)
    units = quantize_model(nn.ModuleDict({"attn": attn}), config)
    assert kind in ("self", "cross")
    return attn, units["attn.processor"]


def test_log2_probabilities_with_the_start_token_kept_match_a_hand_computation():
    tokens = torch.eye(4)[None]  # [1, 4, 4]: v = identity, so the output is the probabilities
    attn, _ = _attention("cross")
    with torch.no_grad():
        cross = attn(tokens, encoder_hidden_states=tokens)[0, 0]
        selfa = attn(tokens)[0, 0]
    # cross: the start column 0.5 kept exactly and out of the max: Δ = 0.3; 2 bits, codes
    # round(-log2(p/Δ)) = round([0, 1, 2.585]) = [0, 1, 3] -> 0.3, 0.15, 0.3/8
    assert torch.allclose(cross, torch.tensor([0.5, 0.3, 0.15, 0.0375]), atol=1e-7)
    # self-attention: log2 too, no start token: Δ = 0.5, codes round([0, .737, 1.737, 3.32])
    assert torch.allclose(selfa, torch.tensor([0.5, 0.25, 0.125, 0.0625]), atol=1e-7)


def test_the_first_key_stays_exact_and_out_of_the_key_quantizer():
    attn, processor = _attention("cross")
    del attn.get_attention_scores  # the real scores again
    seen = {}
    processor.k_bank.observer = lambda k, step: seen.setdefault("k", k)
    context = torch.randn(2, 5, 4)
    with torch.no_grad():
        attn(torch.randn(2, 3, 4), encoder_hidden_states=context)
    assert seen["k"].shape == (2, 4, 4)  # 5 text tokens, the first kept out
    assert torch.equal(seen["k"], context[:, 1:])  # to_k is the identity here


def test_bitops_count_the_attention_matmuls_at_the_units_bits_under_dgq():
    torch.manual_seed(0)
    model = HandCounted()
    config = QuantConfig(wbits=4, abits=8, abits_options=(6, 8), act_groups=4, act_steps=1,
                         softmax_quantizer="log2", softmax_follows_abits=True,
                         rules=(LayerRule("attn.to_out.0", quantize=False),))
    units = quantize_model(model, config)
    _calibrated(model, units, torch.randn(4, 3, 4, 4))
    for unit in units.values():
        unit.set_bits(6)
    ledger = BitLedger(units, list(units))
    with MacCounter(model) as counter, torch.no_grad():
        model(torch.randn(2, 3, 4, 4))  # the conv runs as unfold + matmul: same MACs
    ledger.sites = counter.sites
    six = torch.full((len(units),), 6)
    ledger.record_step(six, six[None])
    [report] = ledger.reports(["p"], [0], elements_per_image=2)
    # softmax at the unit's bits (DGQ's code): attention·V at 6 × 6, not 16 × 6
    by_hand = (CONV + 3 * QKV + LIN) * 4 * 6 + OUT * 32 * 32 + QK * 6 * 6 + PV * 6 * 6
    assert report.bitops_t * 1e12 == 2 * by_hand
