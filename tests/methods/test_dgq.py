"""DGQ on the tiny pipeline: per-step rows keyed by call index under PNDM, bit-identical save and
load with the groups rebuilt from the file, one compiled graph for every bit assignment, the
CLI, and QLIP's policy on a DGQ model with an activation bank."""

import copy
import json

import numpy as np
import pytest
import torch

from qlip.cli import build_parser, main
from qlip.methods.brecq import ReconstructionConfig
from qlip.methods.calib_data import CalibrationSet
from qlip.methods.dgq import DGQConfig, quantize_dgq
from qlip.nn import QuantConfig, quant_units, verify_calibrated
from qlip.pipeline import (
    CalibrationConfig,
    GenerationConfig,
    QuantizeJob,
    generate,
    load_quantized,
    prepare_unet,
    quantize_pipeline,
)

from ..conftest import unet_inputs

PROMPTS = ["a red circle", "two blue squares at the top left", "a star"]
NO_RECON = DGQConfig(reconstruction=ReconstructionConfig(iters=0))


def dgq_quant(options=(4, 8), groups=8, **extra) -> QuantConfig:
    return QuantConfig(wbits=8, abits=options[-1], abits_options=options, act_groups=groups,
                       preset="dgq", softmax_quantizer="log2", softmax_follows_abits=True,
                       keep_start_token=True, **extra)


def _quantize(pipe, folder, options=(4, 8), groups=8, steps=3):
    job = QuantizeJob(method="dgq", quant=dgq_quant(options, groups), dgq=NO_RECON,
                      calibration=CalibrationConfig(num_prompts=2, num_inference_steps=steps,
                                                    num_kept_steps=steps, guidance=3.0))
    return quantize_pipeline(pipe, PROMPTS[:2], job, folder, progress=False)


def _inputs(unet, seed):
    """UNet inputs with the tiny pipeline's prompt length (32 tokens): DGQ's token groups of
    k and v are calibrated for it."""
    x, t, _ = unet_inputs(unet, 2, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    c = torch.randn(2, 32, unet.config.cross_attention_dim, generator=generator)
    return x, t, c


def _grouped_stacks(units):
    return {f"{n}.{p}": b.stack for n, u in units.items() for p, b in u.activation_banks().items()
            if b.kind == "grouped"}


def test_per_step_rows_follow_the_call_index_under_pndm(tiny_pipe, tmp_path):
    from diffusers import PNDMScheduler

    tiny_pipe.scheduler = PNDMScheduler.from_config(tiny_pipe.scheduler.config,
                                                    skip_prk_steps=True)
    units = _quantize(tiny_pipe, tmp_path / "q", steps=3)
    data = CalibrationSet.load(tmp_path / "q" / "calibration.safetensors")
    timesteps = [float(data.timesteps[data.steps == s][0]) for s in range(4)]
    # PNDM makes steps + 1 UNet calls and repeats the second timestep
    assert timesteps[1] == timesteps[2] and len(set(timesteps)) == 3
    assert {u.step_rows() for u in units.values()} == {4}
    by_value = [timesteps.index(t) for t in timesteps]  # a lookup by timestep value
    assert by_value == [0, 1, 1, 3]  # call 2 would read row 1
    name = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    layer, calls = units[name], []
    handle = layer.register_forward_hook(
        lambda m, args, out: calls.append((int(m.step_index()), args[0].clone(), out.clone())))
    generate(tiny_pipe, ["a red circle"], [0], None, GenerationConfig(steps=3, guidance=3.0),
             progress=False)
    handle.remove()
    assert [c[0] for c in calls] == [0, 1, 2, 3]  # row = call index, never the timestep's
    stack = layer.act_banks[0].stack
    assert not torch.equal(stack.scale[:, 1], stack.scale[:, 2])  # one timestep, two rows
    _, x, out = calls[2]
    with torch.no_grad():
        for row, same in ((2, True), (1, False)):
            layer.set_step(row)
            assert torch.equal(layer(x), out) == same, row
    with pytest.raises(ValueError, match="per-step table of 4"):  # 4 PNDM steps: 5 calls
        generate(tiny_pipe, ["a"], [0], None, GenerationConfig(steps=4), progress=False)


def test_save_load_is_bit_identical_with_groups_rebuilt_from_the_file(
        tiny_pipe, _tiny_pipeline_template, tmp_path):
    units = _quantize(tiny_pipe, tmp_path / "q")
    stacks = _grouped_stacks(units)
    chosen = torch.cat([s.chosen_dim for s in stacks.values()])
    assert set(chosen.tolist()) == {0, 1}  # channel for some inputs and steps, token for others
    assert {int(s.scale.shape[-1]) for s in stacks.values()} == {8}
    fresh = copy.deepcopy(_tiny_pipeline_template)
    info = load_quantized(fresh.unet, tmp_path / "q")
    loaded = quant_units(fresh.unet)
    for name, stack in _grouped_stacks(loaded).items():
        original = stacks[name]
        for key in ("chosen_dim", "sizes", "candidate_dims", "group_index_0", "group_index_1",
                    "scale", "zero_point"):
            assert torch.equal(getattr(stack, key), getattr(original, key)), (name, key)
    x, t, c = _inputs(fresh.unet, seed=9)
    for bits in (4, 8):
        for step in range(3):
            outs = []
            for group in (units, loaded):
                for unit in group.values():
                    unit.set_bits(bits)
                    unit.set_step(step)
            with torch.no_grad():
                outs = [m(x, t, encoder_hidden_states=c).sample
                        for m in (tiny_pipe.unet, fresh.unet)]
            assert torch.equal(*outs), (bits, step)
    # the config alone gives the structure, not the groups
    bare = copy.deepcopy(_tiny_pipeline_template)
    with pytest.raises(RuntimeError, match="never calibrated"):
        verify_calibrated(prepare_unet(bare.unet, info.config))


class _Block(torch.nn.Module):
    """Every DGQ unit kind: a conv (unfold + matmul), self- and cross-attention (grouped q/k/v,
    log2 probabilities, the start token kept), a linear."""

    def __init__(self):
        from diffusers.models.attention_processor import Attention

        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.attn1 = Attention(query_dim=8, heads=2, dim_head=4)
        self.attn2 = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x, context):  # x: [B, 3, 4, 4], context: [B, 5, 6]
        h = self.conv(x).flatten(2).transpose(1, 2)  # [B, 16, 8]
        h = self.attn1(h)
        return self.lin(self.attn2(h, encoder_hidden_states=context))


def test_dgq_units_compile_to_one_graph_for_every_bits_and_step():
    from qlip.methods.calibrate import activation_banks
    from qlip.methods.dgq import calibrate_bank_dgq
    from qlip.nn import quantize_model
    from qlip.quant import GroupRangeObserver

    torch.manual_seed(0)
    model, options = _Block(), (4, 8, 32)
    units = quantize_model(model, dgq_quant(options, groups=4, act_steps=2))
    for unit in units.values():
        unit.calibrate_weight()
    banks = activation_banks(units)
    observers = {n: GroupRangeObserver(b.dims) for n, b in banks.items()}
    for name, bank in banks.items():
        bank.observer = observers[name]
    x, context = torch.randn(4, 3, 4, 4), torch.randn(4, 5, 6)
    with torch.no_grad():
        for step in (0, 1):
            for unit in units.values():
                unit.set_step(step)
            model(x * (1 + step), context)
    for name, bank in banks.items():
        bank.observer = None
        calibrate_bank_dgq(bank, observers[name])
    for unit in units.values():
        unit.refresh()
    x, context = x[:2], context[:2]
    # as the seam does it: every unit reads one shared [U, images] slot table and step tensor
    table, step = torch.zeros(len(units), 2, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    for j, unit in enumerate(units.values()):
        unit.bind_bits(table, j)
        unit.bind_step(step)
    with torch.no_grad():
        model(x, context)  # caches the quantized weights, as a first eager call does
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        compiled(x, context)  # fullgraph=True fails on a graph break
    generator = torch.Generator().manual_seed(0)
    with torch.compiler.set_stance("fail_on_recompile"), torch.no_grad():
        outputs = set()
        for row in (1, 0, 1):
            step.fill_(row)
            table.copy_(torch.randint(len(options), table.shape, generator=generator))
            got = compiled(x, context)
            assert torch.equal(got, model(x, context))
            outputs.add(got.sum().item())
        assert len(outputs) == 3  # other bits and steps: other outputs, from the same graph


def _cli_quantize(folder, prompt_file, *extra):
    return main(["quantize", "--model", str(folder[0]), "--method", "dgq", "--wbits", "8",
                 "--calib-prompts", str(prompt_file), "--calib-num", "2", "--calib-steps", "3",
                 "--calib-kept-steps", "3", "--recon-iters", "0", "--device", "cpu", "--out",
                 str(folder[1]), *extra])


def test_cli_quantize_dgq_maps_every_flag_onto_the_config(tiny_pipe_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    q = tmp_path / "q"
    code = _cli_quantize((tiny_pipe_dir, q), prompts, "--groups", "8", "--abits", "6",
                         "--abits-options", "4,6", "--kmeans-init", "2")
    assert code == 0, capsys.readouterr().err
    meta = json.loads((q / "quant_config.json").read_text())
    config = meta["quant_config"]
    assert (config["act_groups"], config["act_steps"], config["preset"]) == (8, 3, "dgq")
    assert config["softmax_quantizer"] == "log2" and config["softmax_follows_abits"]
    assert config["keep_start_token"] and config["abits_options"] == [4, 6]
    assert meta["method"] == "dgq" and meta["method_config"]["dgq"]["kmeans_n_init"] == 2
    code = main(["generate", "a star", "--model", str(tiny_pipe_dir), "--quantized", str(q),
                 "--abits", "4", "--steps", "3", "--guidance", "3", "--device", "cpu",
                 "--out", str(tmp_path / "gen")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "gen" / "report.json").read_text())["images"][0]
    assert report["fab"] == 4.0
    # flags override the method's defaults; each lands on its field
    from qlip.cli import _quant_config

    args = build_parser().parse_args(["quantize", "--method", "dgq", "--softmax-bits", "16",
                                      "--softmax-quantizer", "uniform", "--no-keep-start-token",
                                      "--preset", "qdiffusion", "--groups", "16", "--out", "x"])
    config = _quant_config(args)
    assert (config.softmax_bits, config.softmax_follows_abits, config.softmax_quantizer,
            config.keep_start_token, config.preset, config.act_groups) == (
        16, False, "uniform", False, "qdiffusion", 16)


def test_cli_refuses_bad_dgq_input_before_any_work(tiny_pipe_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    cases = [(["--method", "rtn", "--groups", "8"], "--method dgq"),
             (["--groups", "0"], "act_groups must be an integer >= 1"),
             (["--calib-kept-steps", "2"], "keep every step")]
    for extra, needle in cases:
        argv = ["quantize", "--model", str(tmp_path / "absent"), "--calib-prompts", str(prompts),
                "--calib-steps", "3", "--method", "dgq", "--out", str(tmp_path / "q"), *extra]
        assert main(argv) == 2  # the model folder does not exist: no work was started
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and "no such model" not in err, err


def test_calibration_data_without_every_step_is_refused(tiny_pipe):
    unet = tiny_pipe.unet
    units = prepare_unet(unet, dgq_quant(act_steps=3))
    x, t, c = unet_inputs(unet, 4, seed=1)
    with pytest.raises(ValueError, match=r"lacks steps \[1\]"):
        quantize_dgq(unet, units, CalibrationSet(x, t.float(), c, torch.tensor([0, 0, 2, 2])),
                     NO_RECON, progress=False)


def test_qlip_policy_on_a_dgq_model_with_a_bank(tiny_pipe, _tiny_pipeline_template, tmp_path):
    from qlip.methods.qlip import Q2B, T2Q, Q2BConfig, QLIPModules, save_qlip
    from qlip.pipeline.quantized_model import load_for_sampling
    from qlip.policies import QLIPPolicy

    folder = tmp_path / "q"
    units = _quantize(tiny_pipe, folder, options=(4, 6, 8))
    names = [n for n, u in units.items() if u.dynamic]
    torch.manual_seed(1)
    q2b = Q2B(len(names), 3, Q2BConfig((4, 6, 8), group_steps=2, high_steps=1))
    with torch.no_grad():  # spread the choices: some units low, some high
        q2b.s.copy_(torch.linspace(-20, 20, len(names)))
        q2b.h_logit.normal_()
        q2b.m_logit.normal_()
    modules = QLIPModules(T2Q(tiny_pipe.text_encoder.config.hidden_size, 16).eval(), q2b, names)
    save_qlip(modules, folder)
    fresh = copy.deepcopy(_tiny_pipeline_template)
    policy = load_for_sampling(fresh, folder)  # the DGQ folder, with QLIP in it
    assert isinstance(policy, QLIPPolicy)
    config = GenerationConfig(steps=3, guidance=3.0, batch_size=3, batch_mode="per_image")
    both = generate(fresh, PROMPTS, [0, 1, 2], policy, config, progress=False)
    assert len({r.fab for r in both.reports}) > 1  # the prompts run at different bits
    for i in (0, 2):
        alone = generate(fresh, [PROMPTS[i]], [i], policy, config, progress=False)
        assert np.array_equal(np.asarray(alone.images[0]), np.asarray(both.images[i]))
        assert alone.reports[0].fab == both.reports[i].fab
        assert alone.reports[0].bitops_t == both.reports[i].bitops_t
    # Q2B trains through soft bits: the mixture's gradient reaches the probabilities
    x, t, c = _inputs(tiny_pipe.unet, seed=3)
    logits = torch.zeros(2, 3, requires_grad=True)
    for name in names:
        units[name].set_bits(logits.softmax(dim=1))
    tiny_pipe.unet(x, t, encoder_hidden_states=c).sample.pow(2).mean().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
