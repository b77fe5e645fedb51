"""QLIP's figures on the tiny pipeline: the FAB they show is the ledger's, the shares are hand
counts, layers are drawn in the UNet's order, Q2B's learned map gives each prompt its own FAB,
and `qlip plot-qlip` writes the five PNGs."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from qlip.cli import build_parser, main
from qlip.methods.qlip import Q2B, T2Q, Q2BConfig, QLIPModules, save_qlip
from qlip.nn import QuantConfig, quant_units
from qlip.pipeline import (
    CalibrationConfig,
    GenerationConfig,
    QuantizeJob,
    generate,
    load_for_sampling,
    quantize_pipeline,
)
from qlip.pipeline.generate import dynamic_units
from qlip.qlip_training.cli import figures_config_from_args
from qlip.qlip_training.figures import (
    QLIPFiguresConfig,
    fab,
    fab_by_batch_size,
    predicted_quality,
    requested_bits,
)
from qlip.qlip_training.plots import bit_shares, unet_order
from qlip.qlip_training.reach import REACH_QUALITIES, q2b_fab, reach

PROMPTS = ["a red circle", "two blue squares at the top left", "a star", "a big green star"]


@pytest.fixture(scope="module")
def qlip_folder(_tiny_pipeline_template, tiny_pipe_dir, tmp_path_factory):
    """A W4 model of the tiny pipeline with a hand-set QLIP A{4,8,16} that spreads its choices."""
    folder = tmp_path_factory.mktemp("fig") / "q"
    pipe = copy.deepcopy(_tiny_pipeline_template)
    job = QuantizeJob(quant=QuantConfig(wbits=4, abits=16, abits_options=(4, 8, 16)),
                      calibration=CalibrationConfig(num_prompts=2, num_inference_steps=3,
                                                    num_kept_steps=2, guidance=3.0),
                      base_model=str(tiny_pipe_dir))
    quantize_pipeline(pipe, PROMPTS[:2], job, folder, progress=False)
    names = list(dynamic_units(quant_units(pipe.unet)))
    torch.manual_seed(1)
    q2b = Q2B(len(names), 3, Q2BConfig((4, 8, 16), group_steps=2, high_steps=1))
    with torch.no_grad():
        q2b.s.copy_(torch.linspace(-20, 20, len(names)))
        q2b.h_logit.normal_()
        q2b.m_logit.normal_()
    save_qlip(QLIPModules(T2Q(pipe.text_encoder.config.hidden_size, 16).eval(), q2b, names), folder)
    return folder


def test_figure_fab_is_the_ledgers_fab_requested(qlip_folder, _tiny_pipeline_template):
    pipe = copy.deepcopy(_tiny_pipeline_template)
    policy = load_for_sampling(pipe, qlip_folder)
    units = quant_units(pipe.unet)
    dynamic = list(dynamic_units(units))
    policy.bind({n: units[n].options for n in dynamic})
    bits = requested_bits(pipe, policy, PROMPTS, batch_size=3)  # two batches
    result = generate(pipe, PROMPTS, [0, 1, 2, 3], policy,
                      GenerationConfig(steps=3, guidance=3.0, batch_size=4), progress=False)
    want = [r.fab_requested for r in result.reports]
    np.testing.assert_allclose(fab(bits, units, dynamic), want)
    assert len(set(np.round(want, 6))) > 1  # the prompts do differ
    columns = [result.unit_names.index(n) for n in dynamic]
    np.testing.assert_array_equal(bits, result.requested[:, :, columns])


def test_q2b_map_gives_each_prompt_its_own_fab(qlip_folder, _tiny_pipeline_template):
    """The direction figure's curve is Q2B's map: at a prompt's predicted quality it gives that
    prompt's FAB, whatever the prompt."""
    pipe = copy.deepcopy(_tiny_pipeline_template)
    policy = load_for_sampling(pipe, qlip_folder)
    units = quant_units(pipe.unet)
    dynamic = list(dynamic_units(units))
    policy.bind({n: units[n].options for n in dynamic})
    quality = predicted_quality(pipe, policy, PROMPTS, batch_size=3)
    assert quality.shape == (len(PROMPTS),) and len(set(np.round(quality, 6))) > 1
    want = fab(requested_bits(pipe, policy, PROMPTS, batch_size=3), units, dynamic)
    np.testing.assert_allclose(q2b_fab(policy.modules.q2b, units, dynamic, quality), want)


def test_fab_by_batch_size_in_max_mode_by_hand():
    unit = type("Unit", (), {"fab_member": True, "default_bits": 8})()
    units = {"a": unit, "fixed": unit}  # one dynamic layer, one fixed at 8 bits
    bits = np.array([4, 8, 4, 16]).reshape(4, 1, 1)  # 4 prompts alone, 1 step
    got = fab_by_batch_size(bits, units, ["a"], (1, 2, 3, 4))
    # batches [4, 8] -> 8 and [4, 16] -> 16; of 3: [4, 8, 4] -> 8 (3 images) and [16] (1 image)
    want = {1: (4 + 8 + 4 + 16) / 4, 2: (8 * 2 + 16 * 2) / 4, 3: (8 * 3 + 16) / 4, 4: 16.0}
    assert got == pytest.approx({k: (v + 8) / 2 for k, v in want.items()})


def test_shares_by_hand_and_the_unet_order():
    bits = np.array([[[4, 8], [4, 16]], [[8, 8], [4, 16]]])  # [2 images, 2 steps, 2 units]
    np.testing.assert_allclose(bit_shares(bits, (4, 8, 16)), [[0.75, 0.25, 0], [0, 0.5, 0.5]])
    names = ["conv_in", "time_embedding.linear_1", "down_blocks.0.resnets.0.conv1",
             "up_blocks.0.resnets.0.conv1", "mid_block.resnets.0.conv1", "conv_out"]
    assert [names[i] for i in unet_order(names)] == [names[k] for k in (0, 1, 2, 4, 3, 5)]


def test_plot_qlip_writes_the_five_figures(qlip_folder, tiny_pipe_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    captions = tmp_path / "rich.txt"
    captions.write_text("a star\na red star\na big red star at the top\n\n"
                        "a square\na blue square\na small blue square on the left\n")
    out = tmp_path / "figs"
    code = main(["plot-qlip", "--model", str(tiny_pipe_dir), "--quantized", str(qlip_folder),
                 "--device", "cpu", "--out", str(out), "--prompts", str(prompts),
                 "--richness-captions", str(captions), "--example-scenes", "2",
                 "--guidance", "3"])
    assert code == 0, capsys.readouterr().err
    for name, least in (("bit_share_per_layer.png", 800), ("fab_by_batch_size.png", 600),
                        ("fab_by_richness.png", 800), ("bits_per_step.png", 800),
                        ("q2b_direction.png", 800)):
        width, height = Image.open(out / name).size
        assert width > least and height > 300, name
    numbers = json.loads((out / "figures.json").read_text())
    assert numbers["s3"]["prompts"] == 4 and numbers["s4"]["scenes"] == 2
    s1 = numbers["s1"]  # a batch of one is each prompt alone; a batch never asks for less
    assert s1["fab_max_mode"]["1"] == pytest.approx(s1["fab_per_image"])
    assert list(s1["fab_max_mode"].values()) == sorted(s1["fab_max_mode"].values())
    assert sum(numbers["s3"]["share_of_each_option"].values()) == pytest.approx(1.0)
    assert [e["captions"][0] for e in numbers["s4"]["examples"]] == ["a star", "a square"]
    direction = numbers["direction"]  # the map's ends bracket the held-out prompts' range
    grid = direction["quality_grid"]
    assert grid[0] < direction["heldout_quality"]["min"] <= direction["heldout_quality"]["max"] < grid[-1]
    assert set(direction["quality_by_level_mean"]) == {"0", "1", "2"}
    low, high = direction["fab_at_heldout_min_and_max_quality"]
    assert direction["more_bits_for"] == ("higher predicted quality" if high > low else
                                          "lower predicted quality" if high < low else "neither")
    assert "Q2B gives more bits to" in capsys.readouterr().out


def test_plot_flags_map_onto_the_config():
    args = build_parser().parse_args([
        "plot-qlip", "--quantized", "q", "--out", "o", "--model", "m", "--device", "cpu",
        "--prompts", "p.txt", "--num-prompts", "50", "--richness-captions", "r.txt",
        "--example-scenes", "4", "--curve-scenes", "20", "--seed", "3", "--guidance", "7.5",
        "--batch-size", "8"])
    assert figures_config_from_args(args) == QLIPFiguresConfig(
        quantized="q", out="o", model="m", device="cpu", prompts="p.txt", num_prompts=50,
        richness_captions="r.txt", example_scenes=4, curve_scenes=20, seed=3, guidance=7.5,
        batch_size=8)


def test_an_eval_of_qlip_keeps_every_images_bits(qlip_folder, _tiny_pipeline_template, tmp_path):
    from qlip.evaluation import EvalConfig, EvalPrompt, run_evaluation
    from qlip.pipeline.generate import load_generation_bits

    from ..evaluation.test_harness import _measures

    pipe = copy.deepcopy(_tiny_pipeline_template)
    policy = load_for_sampling(pipe, qlip_folder)
    config = EvalConfig(num_images=3, batch_size=2, steps=3, guidance=3.0, batch_mode="per_image")
    prompts = [EvalPrompt(t) for t in PROMPTS[:3]]
    run_evaluation(pipe, prompts, policy, config, tmp_path, _measures)  # batches [0, 1], [2]
    bits, requested, names = load_generation_bits(tmp_path)
    alone = generate(pipe, PROMPTS[:3], [0, 1, 2], policy,
                     GenerationConfig(steps=3, guidance=3.0, batch_size=3,
                                      batch_mode="per_image"), progress=False)
    assert names == alone.unit_names and bits.shape == (3, 3, len(names))
    np.testing.assert_array_equal(bits, alone.bits)
    np.testing.assert_array_equal(requested, alone.requested)


def test_reach_is_q2b_map_at_the_label_range(qlip_folder, _tiny_pipeline_template):
    """train-qlip's record of how far the prompt moves the bits: Q2B's map at qualities 0 … 1,
    which a prompt-reading Q2B spreads and the timestep-only Q2B holds flat."""
    pipe = copy.deepcopy(_tiny_pipeline_template)
    policy = load_for_sampling(pipe, qlip_folder)
    units = quant_units(pipe.unet)
    dynamic = list(dynamic_units(units))
    q2b = policy.modules.q2b
    got = reach(q2b, units, dynamic)
    want = q2b_fab(q2b, units, dynamic, np.array(REACH_QUALITIES))
    np.testing.assert_allclose(list(got["fab_at_quality"].values()), want)
    assert list(got["fab_at_quality"]) == ["0", "0.25", "0.5", "0.75", "1"]
    assert got["fab_span"] == pytest.approx(want.max() - want.min()) and got["fab_span"] > 0.1
    flat = Q2B(q2b.num_units, q2b.num_steps, replace(q2b.config, ignore_prompt=True))
    flat.load_state_dict(q2b.state_dict())
    assert reach(flat, units, dynamic)["fab_span"] == 0
