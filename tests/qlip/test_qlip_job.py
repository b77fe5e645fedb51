"""`qlip train-qlip` on the tiny pipeline: end to end, resumed after interruptions (the same
result as a straight run), stale caches refused, bad input refused before any work, and the
flags mapped onto the config."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qlip.cli import build_parser, main
from qlip.methods.qlip import Q2B, Q2BConfig, Q2BTrainConfig, T2QConfig, load_qlip
from qlip.methods.qlip import train as q2b_train
from qlip.metrics import srocc
from qlip.nn import quant_units
from qlip.pipeline import (
    GenerationConfig,
    generate,
    qlip_data,
)
from qlip.pipeline.cache import StaleCacheError
from qlip.pipeline.prompts import encode_prompt_batch
from qlip.pipeline.qlip_data import FPRunConfig
from qlip.pipeline.quantized_model import load_for_sampling
from qlip.policies import QLIPPolicy
from qlip.qlip_training import TrainQLIPConfig, prepare_q2b, train_qlip
from qlip.qlip_training.cli import train_config_from_args
from qlip.qlip_training.labels import LabelConfig
from qlip.qlip_training.reach import REACH_QUALITIES, q2b_fab
from qlip.qlip_training.sources import LabelSource

from .conftest import save_w4_model

WORDS = "red blue green small big circle square star left right top the a of".split()
BITS = (4, 8, 16)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    lines = [" ".join(rng.choice(WORDS, int(rng.integers(1, 5)))) for _ in range(200)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def quantized(_tiny_pipeline_template, tiny_pipe_dir, tmp_path_factory):
    """A W4 RTN model of the tiny pipeline with the bank {4, 8, 16}."""
    return save_w4_model(_tiny_pipeline_template, tiny_pipe_dir,
                         tmp_path_factory.mktemp("q") / "w4", BITS, 16, ["a red circle", "a star"])


class _TeacherSource(LabelSource):
    """Labels that are a fixed function of the text (a teacher on the tiny encoder's pooled
    state) so that T2Q can learn them; features = the images' mean colour."""

    def __init__(self, pipe, fail_on_call: int | None = None):
        teacher = torch.randn(pipe.text_encoder.config.hidden_size,
                              generator=torch.Generator().manual_seed(3))
        self.calls = 0

        def score(images, texts):
            self.calls += 1
            if fail_on_call is not None and self.calls == fail_on_call:
                raise KeyboardInterrupt  # as a user stopping the job mid-run
            return torch.tanh(encode_prompt_batch(pipe, list(texts)).pooled @ teacher)

        scorer = type("Scorer", (), {"image_text_similarity": staticmethod(score)})()
        super().__init__("teacher", lambda images: images.mean((2, 3)), scorer, [], None)


def _config(quantized, tiny_pipe_dir, prompt_file, work, **changes) -> TrainQLIPConfig:
    fields = dict(
        quantized=str(quantized), model=str(tiny_pipe_dir), work_dir=str(work),
        out=str(work / "qlip"), prompts=str(prompt_file), num_prompts=96, q2b_prompts=4,
        sampling=FPRunConfig(steps=3, guidance=3.0, chunk=32, batch_size=32, progress=False),
        labels=LabelConfig(label="image_text"), t2q_holdout=0.25,
        t2q=T2QConfig(iters=300, batch_size=64, lr=3e-3),
        q2b=Q2BConfig(bits=BITS, group_steps=2, high_steps=1),
        q2b_train=Q2BTrainConfig(iters=6, batch_size=4, lr=0.1, lam=0.05, checkpoint_every=3),
        progress=False)
    return TrainQLIPConfig(**(fields | changes))


def _quiet(_message):
    pass


def test_the_job_end_to_end(quantized, tiny_pipe_dir, prompt_file, tmp_path,
                            _tiny_pipeline_template):
    config = _config(quantized, tiny_pipe_dir, prompt_file, tmp_path)
    pipe = copy.deepcopy(_tiny_pipeline_template)
    modules = train_qlip(config, _quiet, _TeacherSource(pipe))
    out = tmp_path / "qlip"
    meta = json.loads((out / "qlip.json").read_text())
    assert meta["metrics"]["q2b"]["iters"] == 6 and meta["metrics"]["job"]["num_prompts"] == 96
    # the held-out SROCC in qlip.json is T2Q's on the held-out prompts' labels, and T2Q learnt
    labels = load_file(str(tmp_path / "t2q_image_text" / "labels.safetensors"))
    texts = prompt_file.read_text().split("\n")[:96]
    pooled = encode_prompt_batch(pipe, texts).pooled
    held = labels["heldout"]
    assert len(held) == 24 and not set(held.tolist()) & set(labels["train"].tolist())
    again = srocc(load_qlip(out).t2q(pooled[held]), labels["labels"][held])
    assert meta["metrics"]["t2q"]["srocc"] == pytest.approx(again, abs=1e-6)
    assert again > 0.7, again
    # `qlip generate/eval --quantized OUT` use it: the prompts get bits of the set, forced high first
    fresh = copy.deepcopy(_tiny_pipeline_template)
    policy = load_for_sampling(fresh, out)
    assert isinstance(policy, QLIPPolicy) and policy.modules.unit_names == modules.unit_names
    result = generate(fresh, texts[:3], [0, 1, 2], policy,
                      GenerationConfig(steps=3, guidance=3.0, batch_mode="per_image"),
                      progress=False)
    dynamic = [result.unit_names.index(n) for n in modules.unit_names]
    asked = result.requested[:, :, dynamic]
    assert set(np.unique(asked)) <= set(BITS) and (asked[:, 0] == 16).all()
    # qlip.json records how far the prompt can move the bits: Q2B's map at qualities 0 … 1
    units = quant_units(fresh.unet)
    want = q2b_fab(policy.modules.q2b, units, modules.unit_names, np.array(REACH_QUALITIES))
    got = meta["metrics"]["q2b"]
    np.testing.assert_allclose([got["fab_at_quality"][f"{q:g}"] for q in REACH_QUALITIES], want)
    assert got["fab_span"] == pytest.approx(want.max() - want.min())


def test_a_timestep_only_job_needs_no_t2q_and_ignores_the_prompt(
        quantized, tiny_pipe_dir, prompt_file, tmp_path, _tiny_pipeline_template, monkeypatch):
    out, work = tmp_path / "qlip", tmp_path / "work"
    # the default label (giqa) would need --real on this model: the timestep-only job needs none
    assert main(["train-qlip", "--model", str(tiny_pipe_dir), "--device", "cpu", "--quantized",
                 str(quantized), "--work-dir", str(work), "--out", str(out), "--prompts",
                 str(prompt_file), "--num-prompts", "96", "--q2b-prompts", "4", "--steps", "3",
                 "--guidance", "3", "--chunk", "32", "--batch-size", "32", "--bits", "4,8,16",
                 "--group-steps", "2", "--high-steps", "1", "--q2b-iters", "6",
                 "--q2b-batch-size", "4", "--q2b-lr", "0.1", "--lam", "0.05",
                 "--checkpoint-every", "3", "--ignore-prompt", "--no-progress"]) == 0
    assert not (work / "t2q_data").exists() and (work / "q2b_A4-8-16_noprompt").is_dir()
    meta = json.loads((out / "qlip.json").read_text())
    assert meta["version"] == 2 and meta["ignores_prompt"] and meta["t2q"] is None
    assert meta["metrics"]["t2q"] is None and meta["metrics"]["q2b"]["iters"] == 6
    assert meta["metrics"]["q2b"]["fab_span"] == 0  # the prompt cannot move its bits
    assert load_qlip(out).t2q is None
    fresh = copy.deepcopy(_tiny_pipeline_template)
    policy = load_for_sampling(fresh, out)
    assert isinstance(policy, QLIPPolicy) and not policy.reads_prompt
    assert policy.describe() == "QLIP timestep-only A{4,8,16}"
    texts = prompt_file.read_text().split("\n")[:3]
    result = generate(fresh, texts, [0, 1, 2], policy,
                      GenerationConfig(steps=3, guidance=3.0, batch_mode="per_image"),
                      progress=False)
    dynamic = [result.unit_names.index(n) for n in policy.modules.unit_names]
    asked = result.requested[:, :, dynamic]
    assert (asked == asked[:1]).all() and (asked[:, 0] == 16).all()
    # `qlip per-layer` on the same work folder measures on these Q2B rows: none is sampled again
    monkeypatch.setattr(qlip_data, "capture_trajectories", _no_sampling)
    assert main(["per-layer", "--model", str(tiny_pipe_dir), "--device", "cpu", "--quantized",
                 str(quantized), "--work-dir", str(work), "--prompts", str(prompt_file),
                 "--num-prompts", "4", "--steps", "3", "--guidance", "3", "--chunk", "32",
                 "--target-fab", "10", "--max-rows", "8", "--no-progress",
                 "--out", str(tmp_path / "per_layer.json")]) == 0
    assert json.loads((tmp_path / "per_layer.json").read_text())["rows"] == 8


def _no_sampling(*args, **kwargs):
    raise AssertionError("the trajectories were sampled again instead of reused")


def test_an_interrupted_job_resumes_to_the_straight_result(
        quantized, tiny_pipe_dir, prompt_file, tmp_path, _tiny_pipeline_template, monkeypatch):
    pipe = copy.deepcopy(_tiny_pipeline_template)
    small = dict(num_prompts=64, t2q=T2QConfig(iters=50, batch_size=32))
    straight = _config(quantized, tiny_pipe_dir, prompt_file, tmp_path / "a", **small)
    train_qlip(straight, _quiet, _TeacherSource(pipe))
    config = _config(quantized, tiny_pipe_dir, prompt_file, tmp_path / "b", **small)
    with pytest.raises(KeyboardInterrupt):  # stopped in the second chunk of T2Q data
        train_qlip(config, _quiet, _TeacherSource(pipe, fail_on_call=2))
    assert len(list((tmp_path / "b" / "t2q_data").glob("chunk_*"))) == 1
    real_step, calls = q2b_train._train_step, []

    def stop_at_five(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # stopped in Q2B, after the checkpoint at iteration 3
        return real_step(*args, **kwargs)

    monkeypatch.setattr(q2b_train, "_train_step", stop_at_five)
    source = _TeacherSource(pipe)
    with pytest.raises(KeyboardInterrupt):
        train_qlip(config, _quiet, source)
    assert source.calls == 1  # only the missing chunk was generated
    monkeypatch.setattr(q2b_train, "_train_step", real_step)
    train_qlip(config, _quiet, _TeacherSource(pipe))
    a = load_file(str(tmp_path / "a" / "qlip" / "qlip.safetensors"))
    b = load_file(str(tmp_path / "b" / "qlip" / "qlip.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prepare_q2b_gives_what_the_job_trains_q2b_on(
        quantized, tiny_pipe_dir, prompt_file, tmp_path, _tiny_pipeline_template):
    """A study of Q2B's settings (benchmarks/q2b_sweep.py) trains on prepare_q2b's inputs: the
    job's own rows and qualities, from its caches (nothing generated again), so a Q2B trained
    on them with precomputed FP targets equals the job's."""
    pipe = copy.deepcopy(_tiny_pipeline_template)
    small = dict(num_prompts=64, t2q=T2QConfig(iters=50, batch_size=32))
    config = _config(quantized, tiny_pipe_dir, prompt_file, tmp_path, **small)
    modules = train_qlip(config, _quiet, _TeacherSource(pipe))
    again = _TeacherSource(pipe)
    inputs = prepare_q2b(config, _quiet, again)
    assert again.calls == 0 and len(inputs.quality) == len(inputs.rows) == 4 * 2 * 3
    torch.testing.assert_close(inputs.quality,
                               modules.t2q(inputs.pooled[:4])[inputs.prompt_of_row])
    units = quant_units(inputs.pipe.unet)
    q2b = Q2B(len(modules.unit_names), 3, config.q2b)
    targets = q2b_train.fp_targets(inputs.pipe.unet, inputs.rows, units)
    q2b_train.train_q2b(inputs.pipe.unet, q2b, units, inputs.rows, inputs.quality,
                        replace(config.q2b_train, progress=False), targets=targets)
    torch.testing.assert_close(q2b.state_dict(), modules.q2b.state_dict())
    with pytest.raises(ValueError, match="targets must be"):
        q2b_train.train_q2b(inputs.pipe.unet, Q2B(len(modules.unit_names), 3, config.q2b), units,
                            inputs.rows, inputs.quality, config.q2b_train, targets=targets[:2])
    with pytest.raises(ValueError, match="no stop_after"):
        prepare_q2b(replace(config, stop_after="t2q"), _quiet, again)


def test_the_fp_stages_run_without_a_quantized_model_and_are_reused(
        quantized, tiny_pipe_dir, prompt_file, tmp_path, _tiny_pipeline_template):
    """--stop-after: the FP stages (here up to the trajectories) need no quantized model, so they
    can run while the quantizer calibrates; the full job then generates nothing again."""
    pipe = copy.deepcopy(_tiny_pipeline_template)
    small = dict(num_prompts=64, t2q=T2QConfig(iters=50, batch_size=32))
    first = _TeacherSource(pipe)
    assert train_qlip(_config("", tiny_pipe_dir, prompt_file, tmp_path, stop_after="trajectories",
                              **small), _quiet, first) is None
    assert first.calls == 2 and (tmp_path / "trajectories" / "fingerprint.json").is_file()
    assert not (tmp_path / "qlip").exists() and not list(tmp_path.glob("q2b_*"))
    again = _TeacherSource(pipe)
    modules = train_qlip(_config(quantized, tiny_pipe_dir, prompt_file, tmp_path, **small),
                         _quiet, again)
    assert again.calls == 0 and modules.metrics["q2b"]["iters"] == 6
    with pytest.raises(ValueError, match="--stop-after"):
        _config("", tiny_pipe_dir, prompt_file, tmp_path)
    with pytest.raises(ValueError, match="sensitivity label"):
        _config("", tiny_pipe_dir, prompt_file, tmp_path, stop_after="t2q",
                labels=LabelConfig(label="sensitivity"))


def test_caches_of_other_inputs_are_refused_or_redone(quantized, tiny_pipe_dir, prompt_file,
                                                      tmp_path):
    base = dict(num_prompts=12, t2q_holdout=0.25, labels=LabelConfig(label="sensitivity"),
                t2q=T2QConfig(iters=20), q2b_train=Q2BTrainConfig(iters=2, batch_size=4))
    train_qlip(_config(quantized, tiny_pipe_dir, prompt_file, tmp_path, **base), _quiet)
    other_steps = FPRunConfig(steps=2, guidance=3.0, chunk=32, progress=False)
    with pytest.raises(StaleCacheError, match="steps: 3 .cached. vs 2"):
        train_qlip(_config(quantized, tiny_pipe_dir, prompt_file, tmp_path, **base,
                           sampling=other_steps), _quiet)
    with pytest.raises(StaleCacheError, match="Q2B checkpoint.*lam"):
        train_qlip(_config(quantized, tiny_pipe_dir, prompt_file, tmp_path, **base | {
            "q2b_train": Q2BTrainConfig(iters=2, batch_size=4, lam=0.5)}), _quiet)
    modules = train_qlip(_config(quantized, tiny_pipe_dir, prompt_file, tmp_path, **base,
                                 sampling=other_steps, redo_stale=True), _quiet)
    assert modules.q2b.num_steps == 2
    fingerprint = json.loads((tmp_path / "trajectories" / "fingerprint.json").read_text())
    assert fingerprint["steps"] == 2


def _fails(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_bad_input_is_refused_before_any_work(quantized, tiny_pipe_dir, prompt_file, tmp_path,
                                              capsys):
    common = ["train-qlip", "--model", str(tiny_pipe_dir), "--device", "cpu",
              "--work-dir", str(tmp_path / "work"), "--prompts", str(prompt_file)]
    _fails(capsys, [*common, "--quantized", str(quantized), "--bits", "4,8,32"],
           "[32] not in the activation bank", "--abits-options 4,8,16,32")
    _fails(capsys, [*common, "--quantized", str(tmp_path / "nope")], "no such folder")
    _fails(capsys, [*common, "--quantized", str(tiny_pipe_dir)],
           "not a qlip quantized model folder", "qlip quantize")
    _fails(capsys, [*common[:2], "reference", *common[3:], "--quantized", str(quantized),
                    "--bits", "4,8,16"], "was quantized from", f"--model {tiny_pipe_dir}")
    _fails(capsys, [*common[:-2], "--quantized", str(quantized), "--bits", "4,8,16"],
           "--prompts FILE is needed")
    _fails(capsys, [*common, "--quantized", str(quantized), "--bits", "4,8,16", "--label",
                    "giqa"], "needs --real DIR")
    _fails(capsys, [*common, "--quantized", str(quantized), "--bits", "4,8"], "needs 3 bit")
    assert not (tmp_path / "work").exists()  # nothing was started


def test_every_flag_maps_onto_its_config_field():
    args = build_parser().parse_args([
        "train-qlip", "--quantized", "q", "--bits", "4,5,6", "--model", "m", "--device", "cpu",
        "--out", "o", "--work-dir", "w", "--prompts", "p.txt", "--num-prompts", "500",
        "--prompt-seed", "3", "--keep-heldout-texts", "--q2b-prompts", "50", "--steps", "20", "--guidance", "7.5",
        "--seed", "9", "--chunk", "32", "--batch-size", "8", "--label", "giqa_knn",
        "--giqa-components", "7", "--knn-k", "2", "--realism-k", "4", "--real", "r",
        "--inception-weights", "i.pth", "--clip", "c", "--t2q-iters", "100",
        "--t2q-batch-size", "32", "--t2q-lr", "0.01", "--t2q-holdout", "0.2",
        "--variant", "pq_pm", "--group-steps", "4", "--high-steps", "3", "--force", "p_q",
        "--q2b-iters", "70", "--q2b-batch-size", "6", "--q2b-lr", "0.05", "--lam", "0.3",
        "--penalty-norm", "max", "--q2b-optimizer", "sgd", "--checkpoint-every", "10",
        "--q2b-seed", "5", "--redo-stale", "--stop-after",
        "t2q", "--ignore-prompt", "--no-progress"])
    want = TrainQLIPConfig(
        quantized="q", model="m", out="o", work_dir="w", device="cpu", prompts="p.txt",
        num_prompts=500, prompt_seed=3, exclude_heldout=False, q2b_prompts=50,
        sampling=FPRunConfig(steps=20, guidance=7.5, seed=9, chunk=32, batch_size=8),
        labels=LabelConfig(label="giqa_knn", giqa_components=7, knn_k=2, realism_k=4),
        real="r", inception_weights="i.pth", clip="c",
        t2q=T2QConfig(iters=100, batch_size=32, lr=0.01), t2q_holdout=0.2,
        q2b=Q2BConfig(bits=(4, 5, 6), variant="pq_pm", group_steps=4, high_steps=3, force="p_q",
                      ignore_prompt=True),
        q2b_train=Q2BTrainConfig(iters=70, batch_size=6, lr=0.05, lam=0.3, penalty_norm="max",
                                 optimizer="sgd", checkpoint_every=10, seed=5),
        redo_stale=True, stop_after="t2q", progress=False)
    assert train_config_from_args(args) == want
    defaults = train_config_from_args(build_parser().parse_args(
        ["train-qlip", "--quantized", "q", "--device", "cpu"]))
    assert defaults == TrainQLIPConfig(quantized="q", device="cpu")
