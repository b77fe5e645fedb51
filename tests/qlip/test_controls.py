"""Issue 12's control policies on the tiny pipeline: the timestep-only Q2B (every prompt the same
bits; it trains), the random policy matched to a reference's bit proportions (proportions within
4σ over 4,000 prompts, the same prompt the same bits in any batch, no host read in ``bits``) and
the fixed per-layer assignment (the greedy reaches the target, a unit made sensitive stays high,
the ledger's FAB equals the assignment's); the command lines, and bad input refused first."""

import copy
import json
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from qlip.cli import main
from qlip.methods.bit_assignment import Budget, greedy_assignment
from qlip.methods.qlip import Q2B, T2Q, Q2BConfig, Q2BTrainConfig, QLIPModules, save_qlip, train_q2b
from qlip.methods.qlip.train import bind_soft, fp_targets, option_map
from qlip.methods.unet_inputs import call_unet
from qlip.nn import quant_units
from qlip.pipeline import load_quantized, save_quantized
from qlip.pipeline.generate import load_generation_bits, save_bits
from qlip.pipeline.qlip_data import capture_trajectories
from qlip.pipeline.quantized_model import PolicyConfig, load_for_sampling
from qlip.policies import FixedBits, PerLayerBits, PromptBatch, QLIPPolicy, RandomMatchedBits

from .conftest import save_w4_model

BITS = (4, 6, 8)
PROMPTS = ["a red circle", "two blue squares at the top left", "a star", "green",
           "a small yellow triangle next to a big red square"]
WORDS = "red blue green small big circle square star left right top the a of".split()


@pytest.fixture(scope="module")
def quantized(_tiny_pipeline_template, tiny_pipe_dir, tmp_path_factory):
    """A W4 RTN model of the tiny pipeline with the bank {4, 6, 8}."""
    return save_w4_model(_tiny_pipeline_template, tiny_pipe_dir,
                         tmp_path_factory.mktemp("controls") / "w4", BITS, 8, PROMPTS[:2])


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS, int(rng.integers(1, 5))))
                              for _ in range(40)) + "\n")
    return path


def _loaded(template, folder):
    pipe = copy.deepcopy(template)
    load_quantized(pipe.unet, folder)
    return pipe


def _dynamic(pipe) -> list[str]:
    return [n for n, u in quant_units(pipe.unet).items() if u.dynamic]


def _fails(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@contextmanager
def no_host_reads():
    """Every way a tensor's value reaches Python raises: what ``bits()`` must never do (on a GPU
    each would sync the host with the device every step)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    names = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "cpu")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    for name in names:
        setattr(torch.Tensor, name, refuse)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(torch.Tensor, name, value)


def _batch(prompts, dim=8) -> PromptBatch:
    n = len(prompts)
    return PromptBatch(list(prompts), torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, 1, dim),
                       torch.zeros(n, dim))


# -- (a) the timestep-only Q2B ---------------------------------------------------------------------

def test_timestep_only_q2b_gives_every_prompt_the_same_bits():
    q2b = Q2B(12, 6, Q2BConfig(BITS, group_steps=2, high_steps=1, ignore_prompt=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in q2b.parameters():
            param.normal_(0, 3)
        q2b.s.copy_(torch.linspace(-20, 20, 12))  # a prompt-reading Q2B would spread them
    bits = q2b.bits(torch.tensor([0.0, 0.3, 1.0]), torch.arange(6))  # [S, 3, U]
    assert (bits == bits[:, :1]).all()
    assert len(torch.unique(bits[1:])) > 1  # the layer and the step still decide
    prompt = Q2B(12, 6, Q2BConfig(BITS, group_steps=2, high_steps=1))
    prompt.load_state_dict(q2b.state_dict())
    varied = prompt.bits(torch.tensor([0.0, 0.3, 1.0]), torch.arange(6))
    assert not (varied == varied[:, :1]).all()  # the same parameters read the prompt otherwise


def test_timestep_only_q2b_trains(_tiny_pipeline_template, quantized):
    pipe = _loaded(_tiny_pipeline_template, quantized)
    rows, _ = capture_trajectories(pipe, PROMPTS, steps=4, guidance=3.0, progress=False)
    units = quant_units(pipe.unet)
    config = Q2BConfig(BITS, group_steps=2, high_steps=1, ignore_prompt=True)
    fresh, q2b = Q2B(len(_dynamic(pipe)), 4, config), Q2B(len(_dynamic(pipe)), 4, config)
    history = train_q2b(pipe.unet, q2b, units, rows, torch.rand(len(rows)),
                        Q2BTrainConfig(iters=20, batch_size=4, lr=0.1, lam=0.0, progress=False))
    assert len(history) == 20
    assert _mse(pipe, q2b, rows) < _mse(pipe, fresh, rows)
    torch.testing.assert_close(q2b.s, fresh.s)  # q is constant: s has no say and does not move


@torch.no_grad()
def _mse(pipe, q2b, rows) -> float:
    units = quant_units(pipe.unet)
    dynamic = [u for u in units.values() if u.dynamic]
    targets, total = fp_targets(pipe.unet, rows, units), 0.0
    for step in torch.unique(rows.steps).tolist():
        sel = torch.nonzero(rows.steps == step).flatten()
        for unit in units.values():
            unit.set_step(step)
        bind_soft(dynamic, q2b.probabilities(torch.rand(len(sel)), step)[0],
                  option_map(dynamic, BITS))
        eps = call_unet(pipe.unet, rows.subset(sel).inputs())
        total += float(((eps - targets[sel]) ** 2).sum())
    for unit in dynamic:
        unit.bind_bits(None, 0)
    return total


# -- (b) the random policy matched to a reference --------------------------------------------------

def _reference(seed=0, images=60, steps=3):
    """[images, steps, 4] bits: three dynamic units with planted proportions and a fixed one."""
    rng = np.random.default_rng(seed)
    probs = {0: [0.2, 0.5, 0.3], 1: [0.0, 0.1, 0.9], 2: [0.7, 0.0, 0.3]}
    ref = np.full((images, steps, 4), 32, np.uint8)
    for u, p in probs.items():
        for s in range(steps):
            shifted = np.roll(p, s) if u == 0 else p  # unit 0's proportions change with the step
            ref[:, s, u] = rng.choice(BITS, images, p=shifted)
    return ref, ["u0", "u1", "u2", "fixed"]


def _random_matched(seed=0):
    ref, names = _reference()
    policy = RandomMatchedBits(ref, names, seed)
    policy.bind({"u2": BITS, "u0": BITS, "u1": BITS})  # another order than the reference's
    return policy, ref


def test_random_matched_draws_the_reference_proportions():
    policy, ref = _random_matched()
    n = 4000
    policy.begin(_batch([f"prompt {i}" for i in range(n)]), 3)
    drawn = policy.planned  # [S, B, U]
    column = {"u2": 2, "u0": 0, "u1": 1}
    for j, name in enumerate(policy.unit_names):
        for s in range(3):
            for b in BITS:
                want = float((ref[:, s, column[name]] == b).mean())
                got = float((drawn[s, :, j] == b).float().mean())
                if want == 0:
                    assert got == 0, (name, s, b)  # never a width the reference lacks there
                assert abs(got - want) <= 4 * math.sqrt(want * (1 - want) / n) + 1e-12, \
                    (name, s, b, got, want)


def test_random_matched_is_keyed_by_prompt_and_seed_not_batch():
    policy, _ = _random_matched()
    policy.begin(_batch(["a", "b", "c"]), 3)
    first = policy.planned.clone()
    policy.begin(_batch(["x", "b"]), 3)
    assert torch.equal(policy.planned[:, 1], first[:, 1])
    other, _ = _random_matched(seed=1)
    other.begin(_batch([f"p{i}" for i in range(20)]), 3)
    policy.begin(_batch([f"p{i}" for i in range(20)]), 3)
    assert not torch.equal(other.planned, policy.planned)
    assert not (policy.planned == policy.planned[:, :1]).all()  # prompts differ from each other


def test_random_matched_refuses_what_does_not_fit():
    ref, names = _reference()
    policy = RandomMatchedBits(ref, names)
    with pytest.raises(ValueError, match="no column for 1 of the 2 dynamic units"):
        policy.bind({"u0": BITS, "elsewhere": BITS})
    with pytest.raises(ValueError, match=r"runs u0 at \[4, 6, 8\] bits"):
        policy.bind({"u0": (6, 8), "u1": BITS})
    policy.bind({"u0": BITS})
    with pytest.raises(ValueError, match="cover 3 UNet calls per image; this run makes 4"):
        policy.begin(_batch(["a"]), 4)
    with pytest.raises(ValueError, match="4 unit columns but 3 unit names"):
        RandomMatchedBits(ref, names[:3])


def test_no_policy_reads_a_tensor_on_the_host_per_step():
    names = ["u0", "u1", "u2"]
    options = dict.fromkeys(names, BITS)
    q2b = Q2B(3, 3, Q2BConfig((8, 16, 32), group_steps=2, high_steps=1))
    policies = [FixedBits(6), QLIPPolicy(QLIPModules(T2Q(8, 4), q2b, names)),
                PerLayerBits({"u0": 4, "u1": 8, "u2": 6}), _random_matched()[0]]
    for policy in policies:
        policy.bind(options | ({} if not isinstance(policy, QLIPPolicy)
                               else dict.fromkeys(names, (8, 16, 32))))
        policy.begin(_batch(["a", "b"]), 3)
        with no_host_reads():
            steps = [policy.bits(s, torch.tensor(999 - s)) for s in range(3)]
        assert all(b.shape == (2, 3) for b in steps), policy.describe()
    with pytest.raises(AssertionError, match="read on the host"), no_host_reads():
        bool(torch.tensor(1))  # the check itself works


def _qlip_folder(template, quantized, tmp_path):
    """A copy of the quantized model with a (random, spread) QLIP in it."""
    folder = tmp_path / "qlip"
    folder.mkdir()
    for name in ("quant_config.json", "quant_state.safetensors"):
        (folder / name).write_bytes((quantized / name).read_bytes())
    pipe = _loaded(template, quantized)
    names = _dynamic(pipe)
    torch.manual_seed(1)
    q2b = Q2B(len(names), 2, Q2BConfig(BITS, group_steps=1, high_steps=0))
    with torch.no_grad():
        q2b.s.copy_(torch.linspace(-20, 20, len(names)))
        q2b.h_logit.normal_()
        q2b.m_logit.normal_()
    save_qlip(QLIPModules(T2Q(pipe.text_encoder.config.hidden_size, 16).eval(), q2b, names),
              folder)
    return folder


def test_random_matched_from_the_command_line(quantized, tiny_pipe_dir, _tiny_pipeline_template,
                                              tmp_path, capsys):
    folder = _qlip_folder(_tiny_pipeline_template, quantized, tmp_path)
    common = ["generate", "--model", str(tiny_pipe_dir), "--device", "cpu", "--steps", "2",
              "--guidance", "3", "--batch-mode", "per_image", *PROMPTS[:4]]
    assert main([*common, "--quantized", str(folder), "--out", str(tmp_path / "qlip_run")]) == 0
    random = ["--quantized", str(quantized), "--policy", "random-matched", "--bits-from",
              str(tmp_path / "qlip_run")]
    assert main([*common, *random, "--batch-size", "4", "--out", str(tmp_path / "r4")]) == 0
    assert main([*common, *random, "--batch-size", "1", "--out", str(tmp_path / "r1")]) == 0
    _, reference, names = load_generation_bits(tmp_path / "qlip_run")
    _, four, _ = load_generation_bits(tmp_path / "r4")
    _, one, _ = load_generation_bits(tmp_path / "r1")
    assert np.array_equal(four, one)  # the same prompt, the same bits, whatever its batch
    for s in range(2):  # every drawn width occurs in the reference at that step and unit
        for u in range(len(names)):
            assert set(four[:, s, u]) <= set(reference[:, s, u])
    report = json.loads((tmp_path / "r4" / "report.json").read_text())
    assert report["policy"].startswith("random-matched A{")
    # bad input, refused before any image
    _fails(capsys, [*common, "--quantized", str(quantized), "--policy", "random-matched",
                    "--out", str(tmp_path / "x1")], "needs --bits-from")
    _fails(capsys, [*common, *random[:-1], str(tmp_path / "nothing"), "--out",
                    str(tmp_path / "x2")], "bits.safetensors not found")
    odd = tmp_path / "odd"
    odd.mkdir()
    save_bits(odd / "bits.safetensors", reference, reference.copy(),
              [f"x{i}" for i in range(len(names))])
    _fails(capsys, [*common, *random[:-1], str(odd), "--out", str(tmp_path / "x3")],
           "holds the bits of other units")
    _fails(capsys, [*common, *random, "--abits", "4", "--out", str(tmp_path / "x4")],
           "both choose the bits")
    assert not any((tmp_path / f"x{i}").exists() and any((tmp_path / f"x{i}").glob("*.png"))
                   for i in range(1, 5))


# -- (c) the fixed per-layer assignment ------------------------------------------------------------

def test_greedy_lowers_the_cheapest_unit_per_bit_first():
    # damage[u, k]: MSE with unit u alone at option k (the last column: all at the top)
    damage = torch.tensor([[9.0, 5.0, 0.0], [0.3, 0.2, 0.0], [2.0, 0.1, 0.0], [1.0, 0.5, 0.0]])
    budget = Budget([1.0] * 4, fixed=32.0, total=5.0)  # and one fixed FP layer
    result = greedy_assignment(damage, BITS, budget, 10.5, ["a", "b", "c", "d"])
    order = [(m["unit"], m["to"]) for m in result.moves]
    assert order == [("c", 6), ("b", 6), ("b", 4), ("d", 6), ("d", 4), ("c", 4)], order
    # the sensitive unit a stays high; a move is 2 bits / 5 layers, the closest stop is kept
    assert result.bits == [8, 4, 4, 4] and result.measure == pytest.approx(10.4)
    assert result.measure == pytest.approx(budget.measure(result.bits))
    before = greedy_assignment(damage, BITS, budget, 10.7)  # 10.8 is closer than 10.4
    assert before.measure == pytest.approx(10.8) and len(before.moves) == 5
    with pytest.raises(ValueError, match="outside what options"):
        greedy_assignment(damage, BITS, budget, 9.0)
    with pytest.raises(ValueError, match="outside what options"):
        greedy_assignment(damage, BITS, budget, 14.0)


def _plant_sensitive_unit(template, quantized, folder) -> str:
    """A copy of the model whose first FAB layer's low options are ruined (scales × 40)."""
    pipe = copy.deepcopy(template)
    info = load_quantized(pipe.unet, quantized)
    units = quant_units(pipe.unet)
    name = next(n for n, u in units.items() if u.dynamic and u.fab_member)
    for bank in units[name].dynamic_banks():
        bank.stack.scale[: len(BITS) - 1] *= 40
    units[name].refresh()
    save_quantized(pipe.unet, info, folder)
    return name


def test_per_layer_reaches_the_target_and_keeps_a_sensitive_unit_high(
        quantized, tiny_pipe_dir, prompt_file, _tiny_pipeline_template, tmp_path, capsys):
    planted = tmp_path / "planted"
    sensitive = _plant_sensitive_unit(_tiny_pipeline_template, quantized, planted)
    out = tmp_path / "assignment.json"
    common = ["per-layer", "--model", str(tiny_pipe_dir), "--device", "cpu", "--prompts",
              str(prompt_file), "--num-prompts", "3", "--steps", "2", "--guidance", "3",
              "--max-rows", "8", "--work-dir", str(tmp_path / "work"), "--no-progress"]
    assert main([*common, "--quantized", str(planted), "--target-fab", "5.5", "--out",
                 str(out)]) == 0
    document = json.loads(out.read_text())
    assert abs(document["reached"] - 5.5) <= 0.1 and document["weighting"] == "fab"
    damage = document["damage"]
    assert damage[sensitive]["4"] == max(d["4"] for d in damage.values())
    assert document["bits"][sensitive] == 8  # it stays high
    assert {m["unit"] for m in document["moves"]} and sensitive not in {
        m["unit"] for m in document["moves"]}
    # the ledger's FAB of a run with the assignment is the FAB the greedy reached, exactly
    gen = ["generate", "--model", str(tiny_pipe_dir), "--device", "cpu", "--steps", "2",
           "--guidance", "3", *PROMPTS[:2], "--quantized", str(planted)]
    assert main([*gen, "--policy", "per-layer", "--assignment", str(out), "--out",
                 str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert all(i["fab"] == pytest.approx(document["reached"], abs=1e-9) for i in report["images"])
    # bad input, refused before any work
    _fails(capsys, [*common, "--quantized", str(planted), "--target-fab", "3.5", "--out",
                    str(tmp_path / "no.json")], "target FAB 3.5 is outside", "choose a target")
    _fails(capsys, [*common, "--quantized", str(planted), "--target-fab", "5", "--bits", "4,5",
                    "--out", str(tmp_path / "no.json")], "[5] not in the activation bank")
    _fails(capsys, [*gen, "--policy", "per-layer", "--assignment", str(tmp_path / "none.json"),
                    "--out", str(tmp_path / "r2")], "no such file")
    _fails(capsys, [*gen[:-1], str(quantized), "--policy", "per-layer", "--assignment", str(out),
                    "--out", str(tmp_path / "r3")], "measured on another quantized model")
    assert not (tmp_path / "no.json").exists()


def test_per_layer_damage_is_cached_and_reused_for_any_target(
        quantized, tiny_pipe_dir, prompt_file, _tiny_pipeline_template, tmp_path, capsys,
        monkeypatch):
    from qlip.qlip_training import per_layer

    common = ["per-layer", "--model", str(tiny_pipe_dir), "--device", "cpu", "--prompts",
              str(prompt_file), "--num-prompts", "3", "--steps", "2", "--guidance", "3",
              "--max-rows", "8", "--work-dir", str(tmp_path / "work"), "--no-progress"]
    _fails(capsys, [*common, "--quantized", str(quantized)], "--target-fab", "--damage-only")
    measured = []
    real = per_layer.unit_damage
    monkeypatch.setattr(per_layer, "unit_damage", lambda *a, **k: measured.append(1) or real(*a, **k))
    assert main([*common, "--quantized", str(quantized), "--damage-only"]) == 0
    assert "damage table cached" in capsys.readouterr().out and measured == [1]
    assert len(list((tmp_path / "work" / "per_layer_damage").glob("*.safetensors"))) == 1
    # two targets: the greedy runs twice on the one table, measured once above
    documents = []
    for target, name in (("5.5", "a.json"), ("6.5", "b.json")):
        assert main([*common, "--quantized", str(quantized), "--target-fab", target, "--out",
                     str(tmp_path / name)]) == 0
        assert "damage: reusing" in capsys.readouterr().out
        documents.append(json.loads((tmp_path / name).read_text()))
    assert measured == [1] and documents[0]["damage"] == documents[1]["damage"]
    assert documents[0]["reached"] < documents[1]["reached"]
    # the same table as a fresh measurement in another work folder
    fresh = [*common[:-3], "--work-dir", str(tmp_path / "work2"), "--no-progress"]
    assert main([*fresh, "--quantized", str(quantized), "--target-fab", "5.5", "--out",
                 str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["damage"] == documents[0]["damage"]
    # another quantized model (other state) in the first work folder: measured, not reused
    planted = tmp_path / "planted"
    _plant_sensitive_unit(_tiny_pipeline_template, quantized, planted)
    assert main([*common, "--quantized", str(planted), "--damage-only"]) == 0
    assert measured == [1, 1, 1]
    cached = sorted((tmp_path / "work" / "per_layer_damage").glob("*.safetensors"))
    assert len(cached) == 2
    # a file in the table's place that is not it (another fingerprint): measured again
    from qlip.files import save_tensors
    for path in cached:
        save_tensors({"damage": torch.zeros(1, 3)}, path, {"fingerprint": "{}"})
    assert main([*common, "--quantized", str(quantized), "--damage-only"]) == 0
    assert "not the damage table of these inputs" in capsys.readouterr().err
    assert measured == [1, 1, 1, 1]


def test_per_layer_policy_config_refuses_half_given_flags(quantized, tmp_path):
    with pytest.raises(ValueError, match="needs --assignment"):
        PolicyConfig(policy="per-layer")
    with pytest.raises(ValueError, match="--bits-from is for --policy random-matched"):
        PolicyConfig(bits_from="x")
    with pytest.raises(ValueError, match="needs --quantized"):
        load_for_sampling(object(), None, None, PolicyConfig("per-layer", assignment="a.json"))
