"""QLIP on the tiny pipeline: T2Q learns a text function, Q2B training, the policy in both batch
modes, save → load gives identical bits."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from qlip.methods.qlip import (
    Q2B,
    T2Q,
    Q2BConfig,
    Q2BTrainConfig,
    QLIPModules,
    T2QConfig,
    load_qlip,
    save_qlip,
    train_q2b,
    train_t2q,
)
from qlip.methods.qlip.train import bind_soft, fp_targets, option_map
from qlip.methods.unet_inputs import call_unet
from qlip.metrics.correlation import plcc, srocc
from qlip.nn import QuantConfig, quant_units
from qlip.pipeline import (
    CalibrationConfig,
    GenerationConfig,
    QuantizeJob,
    generate,
    quantize_pipeline,
)
from qlip.pipeline.prompts import encode_prompt_batch
from qlip.pipeline.qlip_data import capture_trajectories
from qlip.pipeline.quantized_model import load_for_sampling
from qlip.policies import QLIPPolicy

PROMPTS = ["a red circle", "two blue squares at the top left", "a star", "green",
           "a small yellow triangle next to a big red square"]
SMALL = CalibrationConfig(num_prompts=2, num_inference_steps=4, num_kept_steps=2, guidance=3.0)
WORDS = "red blue green small big circle square star left right top the a of".split()


def _quantized(pipe, tmp_path, options=(8, 16, 32)):
    job = QuantizeJob(quant=QuantConfig(wbits=4, abits=options[-1], abits_options=options),
                      calibration=SMALL)
    quantize_pipeline(pipe, PROMPTS[:2], job, tmp_path / "q", progress=False)
    return tmp_path / "q"


def _dynamic(pipe):
    return [n for n, u in quant_units(pipe.unet).items() if u.dynamic]


def test_t2q_learns_a_function_of_the_text(tiny_pipe):
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, int(rng.integers(1, 9)))) for _ in range(500)]
    pooled = encode_prompt_batch(tiny_pipe, prompts).pooled
    # the label: a fixed function of the text (a teacher on the encoder's state), rank-normalised
    # to [0, 1] as GIQA labels are; the random tiny encoder encodes word counts too weakly
    teacher = torch.randn(pooled.shape[1], generator=torch.Generator().manual_seed(3))
    raw = torch.tanh(pooled @ teacher)
    label = (raw.argsort().argsort().float() / (len(raw) - 1))
    t2q = train_t2q(pooled[:400], label[:400], T2QConfig(iters=800, batch_size=64, lr=3e-3,
                                                          progress=False))
    predicted = t2q(pooled[400:])
    assert srocc(predicted, label[400:]) > 0.9 and plcc(predicted, label[400:]) > 0.8
    assert not any(p.requires_grad for p in t2q.parameters()) and "first" in dict(t2q.named_buffers())


def _trained(pipe, rows, index, lam, iters=20):
    units = quant_units(pipe.unet)
    q2b = Q2B(len(_dynamic(pipe)), 4, Q2BConfig((4, 6, 8), group_steps=2, high_steps=1))
    quality = torch.linspace(0, 1, len(PROMPTS))[index]
    history = train_q2b(pipe.unet, q2b, units, rows, quality,
                        Q2BTrainConfig(iters=iters, batch_size=4, lr=0.1, lam=lam, progress=False))
    return q2b, history


@torch.no_grad()
def _mse(pipe, q2b, rows, index):
    units = quant_units(pipe.unet)
    dynamic = [u for u in units.values() if u.dynamic]
    targets, total = fp_targets(pipe.unet, rows, units), 0.0
    quality = torch.linspace(0, 1, len(PROMPTS))[index]
    for step in torch.unique(rows.steps).tolist():
        sel = torch.nonzero(rows.steps == step).flatten()
        for unit in units.values():
            unit.set_step(step)
        bind_soft(dynamic, q2b.probabilities(quality[sel], step)[0], option_map(dynamic, (4, 6, 8)))
        eps = call_unet(pipe.unet, rows.subset(sel).inputs())
        total += float(((eps - targets[sel]) ** 2).sum())
    for unit in dynamic:
        unit.bind_bits(None, 0)
    return total


def test_training_lowers_the_loss_and_fab_falls_as_lambda_rises(tiny_pipe, tmp_path):
    _quantized(tiny_pipe, tmp_path, options=(4, 6, 8))
    rows, index = capture_trajectories(tiny_pipe, PROMPTS, steps=4, guidance=3.0, progress=False)
    assert len(rows) == len(PROMPTS) * 2 * 4 and index.tolist()[:10] == [0, 1, 2, 3, 4] * 2
    fabs = []
    for lam in (0.0, 0.02, 1.0):
        q2b, history = _trained(tiny_pipe, rows, index, lam)
        if lam == 0.0:  # the MSE over every row, before (fresh Q2B) and after training
            fresh = Q2B(q2b.num_units, 4, q2b.config)
            assert _mse(tiny_pipe, q2b, rows, index) < _mse(tiny_pipe, fresh, rows, index)
        quality = torch.linspace(0, 1, len(PROMPTS))
        fabs.append(q2b.bits(quality, torch.arange(1, 4)).float().mean().item())
    assert fabs[0] > fabs[1] > fabs[2], fabs


@pytest.mark.parametrize("optimizer, lr", [("adam", 1e-2), ("sgd", 1e3)])
def test_training_resumes_from_its_checkpoint(tiny_pipe, tmp_path, optimizer, lr):
    _quantized(tiny_pipe, tmp_path, options=(4, 6, 8))
    rows, index = capture_trajectories(tiny_pipe, PROMPTS[:2], steps=4, guidance=3.0, progress=False)
    units, quality = quant_units(tiny_pipe.unet), torch.tensor([0.2, 0.8])[index]
    config = Q2BConfig((4, 6, 8), group_steps=2, high_steps=1)
    train = Q2BTrainConfig(iters=6, lr=lr, optimizer=optimizer, checkpoint_every=3, progress=False)
    straight = Q2B(len(_dynamic(tiny_pipe)), 4, config)
    train_q2b(tiny_pipe.unet, straight, units, rows, quality, train)
    resumed = Q2B(len(_dynamic(tiny_pipe)), 4, config)
    train_q2b(tiny_pipe.unet, resumed, units, rows, quality, replace(train, iters=3), tmp_path / "ck")
    again = Q2B(len(_dynamic(tiny_pipe)), 4, config)
    history = train_q2b(tiny_pipe.unet, again, units, rows, quality, train, tmp_path / "ck")
    assert [h["iter"] for h in history] == list(range(6))
    torch.testing.assert_close(again.state_dict(), straight.state_dict())
    # the steps moved Q2B beyond the tolerance: a lost optimiser state would show
    fresh = Q2B(len(_dynamic(tiny_pipe)), 4, config).state_dict()
    assert max(float((v - fresh[k]).abs().max()) for k, v in straight.state_dict().items()) > 1e-3


def _modules(pipe, steps=3):
    names = _dynamic(pipe)
    torch.manual_seed(1)
    t2q = T2Q(pipe.text_encoder.config.hidden_size, 16)
    q2b = Q2B(len(names), steps, Q2BConfig(group_steps=2, high_steps=1))
    with torch.no_grad():  # spread the choices: some units low, some high
        q2b.s.copy_(torch.linspace(-20, 20, len(names)))
        q2b.h_logit.normal_()
        q2b.m_logit.normal_()
    return QLIPModules(t2q.eval(), q2b, names)


def test_policy_in_max_and_per_image_batches(tiny_pipe, tmp_path):
    _quantized(tiny_pipe, tmp_path)
    policy = QLIPPolicy(_modules(tiny_pipe))
    prompts, seeds = PROMPTS[:3], [0, 1, 2]
    alone = [generate(tiny_pipe, [p], [s], policy, GenerationConfig(steps=3, guidance=3.0),
                      progress=False).reports[0] for p, s in zip(prompts, seeds)]
    per_image = generate(tiny_pipe, prompts, seeds, policy,
                         GenerationConfig(steps=3, guidance=3.0, batch_size=3, batch_mode="per_image"),
                         progress=False)
    shared = generate(tiny_pipe, prompts, seeds, policy,
                      GenerationConfig(steps=3, guidance=3.0, batch_size=3, batch_mode="max"),
                      progress=False)
    assert [r.fab for r in per_image.reports] == pytest.approx([r.fab for r in alone])
    assert len({r.fab for r in alone}) > 1  # the prompts do get different bits
    assert all(r.fab == pytest.approx(max(a.fab for a in alone)) or r.fab >= a.fab
               for r, a in zip(shared.reports, alone))
    assert len({r.fab for r in shared.reports}) == 1
    policy.begin(encode_prompt_batch(tiny_pipe, prompts), 3)
    want = policy.bits(1, torch.tensor(0)).amax(0)
    assert shared.reports[0].fab >= float(want.float().mean()) - 1e-6


def test_save_load_gives_identical_bits_and_load_for_sampling_picks_qlip(
        tiny_pipe, _tiny_pipeline_template, tmp_path):
    folder = _quantized(tiny_pipe, tmp_path)
    modules = _modules(tiny_pipe)
    save_qlip(modules, folder)
    loaded = load_qlip(folder)
    batch = encode_prompt_batch(tiny_pipe, PROMPTS)
    q = modules.t2q(batch.pooled)
    torch.testing.assert_close(loaded.t2q(batch.pooled), q)
    assert torch.equal(loaded.q2b.bits(q, torch.arange(3)), modules.q2b.bits(q, torch.arange(3)))
    import copy

    fresh = copy.deepcopy(_tiny_pipeline_template)
    policy = load_for_sampling(fresh, folder)
    assert isinstance(policy, QLIPPolicy) and policy.modules.unit_names == modules.unit_names
    again = copy.deepcopy(_tiny_pipeline_template)
    assert not isinstance(load_for_sampling(again, folder, abits=8), QLIPPolicy)
