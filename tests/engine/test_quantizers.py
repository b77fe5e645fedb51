import pytest
import torch

from qlip.quant import (
    Log2Quantizer,
    RangeObserver,
    StackedUniform,
    UniformQuantizer,
    check_bits,
    mse_range,
    parse_bits_list,
    round_ste,
)


def _err(q, x):
    return float((q(x) - x).pow(2).mean())


def test_error_falls_with_bits():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    errors = []
    for bits in (2, 4, 6, 8, 16):
        q = UniformQuantizer(bits)
        q.calibrate(x)
        errors.append(_err(q, x))
    assert all(a > 3 * b for a, b in zip(errors, errors[1:]))  # each step of >=2 bits: >3x less
    assert errors[-1] < 1e-8


def test_bypass_is_identity_and_bits_are_checked():
    x = torch.randn(10)
    assert torch.equal(UniformQuantizer(32)(x), x)
    for bad in (1, 17, 31, 64, 8.0, True):
        with pytest.raises(ValueError, match="bits"):
            check_bits(bad)
    assert parse_bits_list("16,8,32") == (8, 16, 32)
    with pytest.raises(ValueError):
        parse_bits_list("8,1")


def test_grid_has_exactly_2_pow_b_levels_and_keeps_zero():
    x = torch.linspace(-1.0, 3.0, 10_000)
    q = UniformQuantizer(4)
    q.calibrate(x)
    out = q(x)
    assert len(torch.unique(out)) == 16
    assert float(q(torch.zeros(1))) == 0.0


def test_symmetric_grid_is_centered():
    q = UniformQuantizer(8, symmetric=True)
    q.calibrate(torch.tensor([-1.0, 0.5]))
    assert float(q.zero_point) == 128.0
    assert torch.allclose(q(torch.tensor([-0.5])), -q(torch.tensor([0.5])), atol=1e-6)


def test_per_channel_beats_per_tensor_on_channels_of_different_scale():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g) * torch.logspace(-2, 1, 8)[:, None]
    per_tensor, per_channel = UniformQuantizer(4), UniformQuantizer(4, channel_dim=0, num_channels=8)
    per_tensor.calibrate(w)
    per_channel.calibrate(w)
    # the smallest-scale channel is wiped out per tensor, kept per channel
    small = slice(0, 1)
    assert _err(per_channel, w) < _err(per_tensor, w)
    assert float((per_channel(w)[small] - w[small]).abs().max()) < 0.01
    assert float((per_tensor(w)[small]).abs().max()) == 0.0


def test_group_quantization_shares_parameters_within_a_group():
    x = torch.randn(2, 6, 5) * torch.tensor([1, 1, 1, 50, 50, 50.0])[None, :, None]
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    q = UniformQuantizer(8, channel_dim=1, group_index=groups)
    q.calibrate(x)
    assert q.scale.shape == (2,)
    assert float(q.scale[1] / q.scale[0]) > 20
    tensor_q = UniformQuantizer(8)
    tensor_q.calibrate(x)
    assert _err(q, x) < _err(tensor_q, x)


def test_mse_search_lowers_the_p_norm_error_on_heavy_tails():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20_000, generator=g)
    x[:20] *= 12  # a few outliers stretch the min-max range
    q_minmax, q_mse = UniformQuantizer(4), UniformQuantizer(4)
    q_minmax.calibrate(x, "minmax")
    q_mse.calibrate(x, "mse")
    lp = lambda q: float((q(x) - x).abs().pow(2.4).mean())  # noqa: E731
    assert lp(q_mse) < 0.8 * lp(q_minmax)
    lo, hi = mse_range(x, 4)
    assert float(hi) < float(x.max())  # it clipped


def test_percentile_clips_outliers():
    x = torch.cat([torch.randn(100_000), torch.tensor([1000.0])])
    q = UniformQuantizer(8)
    q.calibrate(x, "percentile", percentile=99.9)
    assert float(q.scale) < 0.1


def test_step_tables_select_a_row_per_step():
    q = StackedUniform((8,), num_steps=3)
    for step, scale in enumerate((1.0, 10.0, 100.0)):
        q.slot_view(8).calibrate(torch.tensor([-scale, scale]), step=step)
    x = torch.tensor([0.5])
    outs = [float(q(x, torch.tensor(0), step=torch.tensor(step))) for step in range(3)]
    assert outs[0] == pytest.approx(0.5, abs=0.005)
    assert abs(outs[2] - 0.5) > abs(outs[0] - 0.5)
    fresh = StackedUniform((8,), num_steps=2)
    fresh.slot_view(8).calibrate(torch.randn(10), step=0)
    with pytest.raises(RuntimeError, match="never calibrated"):
        fresh.check_calibrated()
    assert torch.isnan(fresh(x, torch.tensor(0), step=torch.tensor(1))).all()  # never plausible


def test_single_bit_step_tables_select_a_row_per_step():
    q = UniformQuantizer(8, num_steps=3)
    for step, scale in enumerate((1.0, 10.0, 100.0)):
        q.calibrate(torch.tensor([-scale, scale]), step=step)
    x = torch.tensor([0.5])
    outs = []
    for step in range(3):
        q.step = step
        outs.append(float(q(x)))
    assert outs[0] == pytest.approx(0.5, abs=0.005)
    assert abs(outs[2] - 0.5) > abs(outs[0] - 0.5)
    fresh = UniformQuantizer(8, num_steps=2)
    fresh.calibrate(torch.randn(10), step=0)
    fresh.step = 1
    with pytest.raises(RuntimeError, match="never calibrated"):
        fresh.dequantize(x)


def test_codes_round_trip_equals_fake_quant():
    w = torch.randn(16, 32)
    q = UniformQuantizer(4, channel_dim=0, num_channels=16)
    q.calibrate(w, "mse")
    codes = q.quantize_codes(w)
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.equal(q.dequantize(codes), q(w))


def test_straight_through_rounding_passes_gradients():
    x = torch.tensor([0.3, 1.7], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(2))
    assert torch.equal(round_ste(x.detach()), torch.tensor([0.0, 2.0]))


def test_log2_quantizer_lands_on_powers_of_two_of_the_max():
    p = torch.softmax(torch.randn(4, 16, 16), dim=-1)
    q = Log2Quantizer(4)
    out = q(p)
    delta = p.max()
    exponents = -torch.log2(out / delta)
    assert torch.allclose(exponents, exponents.round(), atol=1e-4)
    assert float(out.max()) == pytest.approx(float(delta))
    big = p > delta / 64  # values on the grid: relative error at most sqrt(2)-1
    assert float(((out - p).abs() / p)[big].max()) <= 0.4143


def test_observer_tracks_ranges_per_step_and_samples():
    obs = RangeObserver(max_samples=100, per_step=True)
    obs(torch.tensor([1.0, -2.0]), step=0)
    obs(torch.tensor([5.0]), step=0)
    obs(torch.tensor([0.5]), step=3)
    assert obs.steps == [0, 3]
    assert float(obs.range(0)[0]) == -2.0 and float(obs.range(0)[1]) == 5.0
    assert obs.sample(0).numel() == 3
