"""AdaRound: initialisation, regulariser schedule, and a layer reconstruction that beats RTN."""

import pytest
import torch
from torch import nn

from qlip.methods.brecq import ReconstructionConfig, train_rounding
from qlip.methods.runner import CachedCalls
from qlip.nn import QuantConfig, quantize_model
from qlip.quant import UniformQuantizer
from qlip.quant.adaround import AdaRoundQuantizer, annealed_beta, rectified_sigmoid


def test_beta_schedule_is_off_during_warmup_then_anneals_from_20_to_2():
    betas = [annealed_beta(i, 100) for i in range(101)]
    assert betas[:20] == [None] * 20
    assert betas[20] == 20.0 and betas[100] == 2.0
    assert betas[60] == pytest.approx(11.0)  # linear: halfway between 20 and 2
    assert all(a >= b for a, b in zip(betas[20:], betas[21:]))


def test_init_reproduces_the_weight_and_its_hard_rounding_is_nearest():
    torch.manual_seed(0)
    w = torch.randn(6, 200)
    q = UniformQuantizer(4, channel_dim=0, num_channels=6)
    q.calibrate(w)
    ada = AdaRoundQuantizer(q, w)
    # h(α) equals the fractional part: the soft weight is the FP weight wherever the grid
    # reaches (the rounded zero-point can leave the extremes up to half a step outside)
    error = (ada() - w).abs()
    assert (error < 1e-5).float().mean() > 0.9
    assert (error <= q.scale[:, None] / 2 + 1e-6).all()
    # h(α) ≥ 0.5 exactly when α ≥ 0: before training, the hard rounding is round-to-nearest
    assert torch.equal(ada.codes(), q.quantize_codes(w))


def test_regulariser_is_zero_at_binary_rounding_and_large_in_between():
    q = UniformQuantizer(4)
    w = torch.linspace(-1, 1, 50)
    q.calibrate(w)
    ada = AdaRoundQuantizer(q, w)
    with torch.no_grad():
        ada.alpha.fill_(20.0)
    assert rectified_sigmoid(ada.alpha).min() == 1.0
    assert ada.regularizer(2.0).item() == 0.0
    with torch.no_grad():
        ada.alpha.fill_(0.0)  # h = 0.5: maximal penalty, 1 per weight
    assert ada.regularizer(2.0).item() == pytest.approx(50.0)


def test_layer_reconstruction_beats_round_to_nearest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    units = quantize_model(model, QuantConfig(wbits=4, abits=8))
    layer = units["0"]
    layer.calibrate_weight("minmax")
    for bank in layer.activation_banks().values():
        bank.enabled = False  # weights only, as in Q-Diffusion's weight reconstruction
    # correlated inputs: with independent ones nearest rounding is already optimal
    x = torch.randn(256, 8) @ torch.randn(8, 32)
    with torch.no_grad():
        target = x @ layer.weight.T + layer.bias
        rtn_error = ((layer(x) - target) ** 2).sum(1).mean().item()
    calls = CachedCalls()
    calls.add((x,), {}, len(x))
    calls.finish(torch.device("cpu"), 64)
    config = ReconstructionConfig(iters=300, batch_size=32, lr=1e-2)
    codes = train_rounding(layer, {"0": layer}, calls, target, config, seed=0, desc="",
                           progress=False)
    layer.set_weight_codes(codes["0"])
    with torch.no_grad():
        ada_error = ((layer(x) - target) ** 2).sum(1).mean().item()
    assert ada_error < 0.7 * rtn_error, (ada_error, rtn_error)
