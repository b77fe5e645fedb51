"""Bits are data: per-image and soft bits, one compiled graph for every bit assignment, the seam's
batch modes, and bit-for-bit agreement with the engine before bits became data."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qlip.methods.calib_data import CalibrationSet
from qlip.methods.rtn import quantize_rtn
from qlip.nn import QuantConfig, QuantUnit, quant_units
from qlip.pipeline import (
    CalibrationConfig,
    GenerationConfig,
    QuantizeJob,
    generate,
    prepare_unet,
    quantize_pipeline,
)
from qlip.policies import BitPolicy

from ..conftest import unet_inputs

OPTIONS = (4, 8, 32)


@pytest.fixture
def quantized(tiny_pipe):
    """The tiny UNet at W4 with an activation bank {4, 8, 32}, softmax at 8 bits, RTN-calibrated."""
    unet = tiny_pipe.unet
    units = prepare_unet(unet, QuantConfig(wbits=4, abits=8, abits_options=OPTIONS, softmax_bits=8))
    x, t, c = unet_inputs(unet, 8, seed=1)
    quantize_rtn(unet, units, CalibrationSet(x, t.float(), c, torch.zeros(8, dtype=torch.long)),
                 progress=False)
    return unet, units


def _set_all(units, bits) -> None:
    for unit in units.values():
        unit.set_bits(bits)


def _call(unet, x, t, c):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=c).sample


def test_per_image_bits_equal_each_image_alone(quantized):
    unet, units = quantized
    x, t, c = unet_inputs(unet, 3, seed=2)
    cfg = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([c * 0, c]))  # guidance halves
    bits = torch.tensor([4, 8, 32])
    _set_all(units, bits)
    together = _call(unet, *cfg)
    for i, b in enumerate(bits.tolist()):
        rows = [i, i + 3]
        _set_all(units, b)
        alone = _call(unet, *(v[rows] for v in cfg))
        # equal up to the float reassociation of a different batch size in the FP ops
        assert torch.allclose(together[rows], alone, rtol=1e-4, atol=1e-5), f"image {i} at {b}"
        _set_all(units, 4 if b != 4 else 8)
        other = _call(unet, *(v[rows] for v in cfg))
        assert (together[rows] - other).abs().max() > 1e-3  # other bits: visibly another output


def test_soft_bits_run_the_argmax_and_differentiate_the_mixture():
    from qlip.nn import ActivationBank

    bank = ActivationBank(OPTIONS)
    data = torch.randn(4, 6)
    for slot in bank.slots():
        slot.calibrate(data)
    x = torch.randn(4, 6)  # two images × two guidance halves
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]], requires_grad=True)
    out = bank(x, probs)
    hard = bank(x, probs.detach().argmax(dim=1))
    assert torch.equal(out, hard)  # forward: the most probable option, exactly
    weights = torch.randn_like(x)
    (out * weights).sum().backward()
    # d out / d p_k = Q_k(x): the gradient of the mixture Σ_k p_k Q_k(x)
    per_option = torch.stack([bank(x, torch.tensor(k)) for k in range(3)])  # [K, 4, 6]
    rows = per_option.unflatten(1, (2, 2))  # [K, copies, images, 6]
    expected = (rows * weights.unflatten(0, (2, 2))).sum(dim=(1, 3)).T  # [images, K]
    assert torch.allclose(probs.grad, expected, atol=1e-5)


def test_soft_bits_through_the_unet_reach_the_probabilities(quantized):
    unet, units = quantized
    x, t, c = unet_inputs(unet, 2, seed=3)
    dynamic = [u for u in units.values() if u.dynamic]
    logits = torch.zeros(2, len(OPTIONS), requires_grad=True)
    probs = logits.softmax(dim=1)
    for unit in dynamic:
        unit.set_bits(probs)
    out = unet(x, t, encoder_hidden_states=c).sample
    penalty = torch.stack([u.expected_bits() for u in dynamic]).mean(dim=0)  # [images]
    assert torch.allclose(penalty, torch.full((2,), sum(OPTIONS) / 3))
    (out.pow(2).mean() + 0.01 * penalty.sum()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_setting_old_style_abits_is_refused_with_guidance(quantized):
    _, units = quantized
    unit = next(iter(units.values()))
    with pytest.raises(AttributeError, match="set_bits"):
        unit.abits = 8
    with pytest.raises(ValueError, match="not in this layer's bank"):
        unit.set_bits(torch.tensor([8, 6]))
    with pytest.raises(ValueError, match="probabilities"):
        unit.set_bits(torch.rand(2, 5))


def _micro_unet():
    """A one-level UNet with cross-attention: every kind of unit, as few ops as possible to trace."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8,), layers_per_block=1, sample_size=4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4, mid_block_type=None)
    units = prepare_unet(unet, QuantConfig(wbits=4, abits=8, abits_options=OPTIONS, softmax_bits=8))
    x, t, c = unet_inputs(unet, 4, seed=1)
    quantize_rtn(unet, units, CalibrationSet(x, t.float(), c, torch.zeros(4, dtype=torch.long)),
                 progress=False)
    return unet, units


def test_one_graph_and_no_recompilation_for_any_bits():
    unet, units = _micro_unet()
    x, t, c = unet_inputs(unet, 2, seed=4)
    compiled = torch.compile(unet, backend="eager", fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    cases = {
        "int": lambda: int(torch.tensor(OPTIONS)[torch.randint(3, (1,), generator=generator)]),
        "per_image": lambda: torch.tensor(OPTIONS)[torch.randint(3, (2,), generator=generator)],
        "soft": lambda: torch.rand(2, 3, generator=generator).softmax(dim=1),
    }
    for mode, draw in cases.items():
        torch._dynamo.reset()
        for unit in units.values():
            unit.set_bits(draw())
        with torch.no_grad():
            compiled(x, t, encoder_hidden_states=c)  # compiles: fullgraph=True fails on a break
        with torch.compiler.set_stance("fail_on_recompile"), torch.no_grad():
            for _ in range(2):
                for unit in units.values():  # every unit at its own new bits
                    unit.set_bits(draw())
                got = compiled(x, t, encoder_hidden_states=c).sample
                assert torch.equal(got, _call(unet, x, t, c)), mode
    # the seam's way: every unit reads a shared table, rewritten in place or bound anew
    dynamic = list(units.values())
    table = torch.zeros(len(dynamic), 2, dtype=torch.long)
    for j, unit in enumerate(dynamic):
        unit.bind_bits(table, j)
    with torch.no_grad():
        compiled(x, t, encoder_hidden_states=c)
    with torch.compiler.set_stance("fail_on_recompile"), torch.no_grad():
        for _ in range(2):
            table.copy_(torch.randint(3, table.shape, generator=generator))
            assert torch.equal(compiled(x, t, encoder_hidden_states=c).sample, _call(unet, x, t, c))
        other = torch.randint(3, table.shape, generator=generator)
        for j, unit in enumerate(dynamic):  # the next generation batch binds a new table
            unit.bind_bits(other, j)
        assert torch.equal(compiled(x, t, encoder_hidden_states=c).sample, _call(unet, x, t, c))


class PerUnitPolicy(BitPolicy):
    """Unit j at OPTIONS[j % 3] for the first prompt and OPTIONS[(j + 1) % 3] for the others."""

    def possible_bits(self):
        return set(OPTIONS)

    def begin(self, batch, num_steps):
        columns = torch.arange(len(self.unit_names))
        first = torch.tensor(OPTIONS)[columns % 3]
        rest = torch.tensor(OPTIONS)[(columns + 1) % 3]
        self.wants = torch.stack([first] + [rest] * (len(batch) - 1))  # [B, U]

    def bits(self, step, timestep):
        return self.wants


def _quantize_bank(pipe, tmp_path):
    job = QuantizeJob(quant=QuantConfig(wbits=8, abits=8, abits_options=OPTIONS),
                      calibration=CalibrationConfig(num_prompts=2, num_inference_steps=3,
                                                    num_kept_steps=2, guidance=3.0))
    return quantize_pipeline(pipe, ["a red circle", "two squares"], job, tmp_path, progress=False)


def test_policy_columns_reach_their_units(tiny_pipe, tmp_path):
    units = _quantize_bank(tiny_pipe, tmp_path)
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, module.active_bits().tolist())
        return hook

    dynamic = [n for n, u in units.items() if u.dynamic]
    handles = [units[n].register_forward_pre_hook(record(n)) for n in dynamic
               if not n.endswith("processor")]
    config = GenerationConfig(steps=2, guidance=3.0, batch_size=2, batch_mode="per_image")
    policy = PerUnitPolicy()
    generate(tiny_pipe, ["a", "b"], [0, 1], policy, config, progress=False)
    for h in handles:
        h.remove()
    assert seen
    for name, bits in seen.items():
        j = policy.unit_names.index(name)
        assert bits == [OPTIONS[j % 3], OPTIONS[(j + 1) % 3]], name


def test_per_image_generation_equals_each_prompt_alone(tiny_pipe, tmp_path):
    _quantize_bank(tiny_pipe, tmp_path)
    policy = PerUnitPolicy()
    config = GenerationConfig(steps=2, guidance=3.0, batch_size=2, batch_mode="per_image")
    both = generate(tiny_pipe, ["a red circle", "a star"], [0, 1], policy, config, progress=False)
    first = generate(tiny_pipe, ["a red circle"], [0], policy, config, progress=False)
    assert np.array_equal(np.asarray(both.images[0]), np.asarray(first.images[0]))
    assert both.reports[0].fab == first.reports[0].fab == both.reports[0].fab_requested
    assert both.reports[0].bitops_t == first.reports[0].bitops_t
    assert both.reports[0].bitops_t != both.reports[1].bitops_t  # each image at its own bits
    maxed = generate(tiny_pipe, ["a red circle", "a star"], [0, 1], policy,
                     GenerationConfig(steps=2, guidance=3.0, batch_size=2), progress=False)
    assert maxed.reports[0].fab == maxed.reports[1].fab  # the batch's maximum, for both
    assert maxed.reports[0].fab > max(r.fab_requested for r in both.reports)


def test_units_share_one_interface(quantized):
    _, units = quantized
    kinds = {u.kind for u in units.values()}
    assert kinds == {"linear", "conv2d", "attention"}
    for unit in units.values():
        assert isinstance(unit, QuantUnit)
        assert unit.activation_banks() and unit.options == OPTIONS
        unit.set_bits(4)
        assert int(unit.active_bits()) == 4


def _avx2() -> bool:
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = Path("/proc/cpuinfo")
    return not flags.is_file() or " avx2" in flags.read_text()


@pytest.mark.skipif(not _avx2(), reason="the reference was written with AVX2 float kernels; this "
                    "CPU cannot run them")
@pytest.mark.parametrize("name", ["w8", "w4log2"])
def test_max_mode_reproduces_the_engine_before_bits_became_data(tmp_path, name):
    """``data/max_mode_reference.safetensors`` was written by the engine of the commit before
    this change (``make_reference.py``): same pipeline, calibration and calls, bit for bit. The
    check runs in a child process pinned to the reference's instruction set
    (``max_mode_check.REFERENCE_ISA``): an AVX-512 CPU's kernels sum in another order, and this
    test failed on one before the pins."""
    import os
    import subprocess
    import sys

    from .max_mode_check import REFERENCE_ISA

    root = Path(__file__).parents[2]
    env = {**os.environ, **REFERENCE_ISA,
           "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "tests.engine.max_mode_check", name,
                           str(tmp_path)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_format_1_folders_still_load(tiny_pipe, tmp_path, _tiny_pipeline_template):
    """Format 1 kept one quantizer per bit-width; loading converts it to the stacked banks."""
    import copy
    import json

    from safetensors.torch import save_file

    from qlip.pipeline import load_quantized
    from qlip.pipeline.saving import CONFIG_FILE, STATE_FILE

    _quantize_bank(tiny_pipe, tmp_path / "q")
    state = load_file(str(tmp_path / "q" / STATE_FILE))
    old = {}
    for key, value in state.items():
        prefix, _, name = key.rpartition(".stack.")
        if not prefix:
            old[key] = value
            continue
        for slot, bits in enumerate(tiny_pipe.unet.get_submodule(prefix).options):
            if bits == 32:
                continue  # format 1 had no quantizer for the bypass
            row = value[slot]  # [T, P] or [T]
            old[f"{prefix}.quantizers.{bits}.{name}"] = row[0].clone() if name != "calibrated" \
                else row[0].clone().reshape(())
    save_file(old, str(tmp_path / "q" / STATE_FILE))
    meta = json.loads((tmp_path / "q" / CONFIG_FILE).read_text())
    (tmp_path / "q" / CONFIG_FILE).write_text(json.dumps({**meta, "version": 1}))
    fresh = copy.deepcopy(_tiny_pipeline_template)
    load_quantized(fresh.unet, tmp_path / "q")
    x, t, c = unet_inputs(fresh.unet, 2, seed=5)
    for bits in OPTIONS:
        _set_all(quant_units(tiny_pipe.unet), bits)
        _set_all(quant_units(fresh.unet), bits)
        assert torch.equal(_call(tiny_pipe.unet, x, t, c), _call(fresh.unet, x, t, c)), bits
