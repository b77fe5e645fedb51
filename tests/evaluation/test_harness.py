"""The evaluation harness on a tiny pipeline with a stand-in feature extractor: metrics written,
an interrupted run resumes without regenerating, bad input is refused clearly."""

import json

import pytest
import torch
import torch.nn.functional as F

from qlip.cli import main
from qlip.evaluation import EvalConfig, EvalPrompt, run_evaluation
from qlip.evaluation import harness as harness_module
from qlip.evaluation.harness import Measures
from qlip.metrics.bootstrap import BootstrapConfig


class PixelFeatures:
    """A fixed, deterministic FeatureExtractor + ImageTextScorer for tests."""

    def global_features(self, images):
        return torch.cat([images.mean((2, 3)), images.std((2, 3)),
                          F.avg_pool2d(images, 8).flatten(1)[:, :6]], dim=1)

    def spatial_features(self, images):
        return F.avg_pool2d(images, 4).flatten(1)

    def image_text_similarity(self, images, texts):
        return images.mean((1, 2, 3)) * torch.tensor([len(t) / 20 for t in texts])


def _measures(size):
    g = torch.Generator().manual_seed(0)
    return Measures(extractor=PixelFeatures(), scorer=PixelFeatures(),
                    real_images=torch.rand(12, 3, size, size, generator=g))


PROMPTS = [EvalPrompt(t, richness=r) for t, r in
           [("red", 0), ("a red circle", 1), ("blue", 0), ("a blue square", 1), ("star", 0),
            ("a green star", 1)]]
CONFIG = EvalConfig(num_images=6, batch_size=2, steps=2, guidance=3.0)


FAST = BootstrapConfig(resamples=50)


@pytest.fixture(autouse=True)
def fast_bootstrap(monkeypatch):
    """Intervals from 50 resamples: the tests check their plumbing, not their precision."""
    monkeypatch.setattr(harness_module, "DEFAULT_BOOTSTRAP", FAST)


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_without_regenerating(tiny_pipe, tmp_path, monkeypatch):
    calls, interrupted = [], []
    real_generate = harness_module.generate

    def flaky(pipe, prompts, seeds, *args, **kwargs):
        calls.append(list(prompts))
        if len(calls) == 2 and not interrupted:
            interrupted.append(True)
            raise Interrupted  # the run is stopped after its first batch
        return real_generate(pipe, prompts, seeds, *args, **kwargs)

    monkeypatch.setattr(harness_module, "generate", flaky)
    with pytest.raises(Interrupted):
        run_evaluation(tiny_pipe, PROMPTS, None, CONFIG, tmp_path, _measures)
    assert len(list((tmp_path / "images").glob("*.png"))) == 2
    calls.clear()
    metrics = run_evaluation(tiny_pipe, PROMPTS, None, CONFIG, tmp_path, _measures, label="FP")
    assert sum(len(c) for c in calls) == 4  # only the 4 missing images were generated
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("fid", "sfid", "clip_score", "giqa", "fab", "weighted_bits", "bitops_t",
                "num_images"):
        assert saved[key] is not None, key
    assert saved["num_images"] == 6 and saved["fab"] == 32.0
    assert set(saved["by_richness"]) == {"0", "1"}
    assert metrics["fid"] > 0
    assert (tmp_path / "metrics.md").read_text().startswith("# FP")
    assert (tmp_path / "grid.png").is_file()


def test_same_images_compared_to_themselves_have_zero_distance(tiny_pipe, tmp_path):
    run_evaluation(tiny_pipe, PROMPTS[:2], None, EvalConfig(num_images=2, batch_size=2, steps=1),
                   tmp_path / "a", _measures)
    metrics = run_evaluation(tiny_pipe, PROMPTS[:2], None,
                             EvalConfig(num_images=2, batch_size=2, steps=1), tmp_path / "b",
                             _measures, reference_run=tmp_path / "a")
    assert metrics["image_mse_vs_reference"] == 0.0
    assert metrics["psnr_vs_reference"] == 100.0  # identical: the cap
    assert metrics["intervals"]["psnr_vs_reference"] == [100.0, 100.0]


def test_every_metric_has_an_interval_and_the_feature_file_recomputes_it(tiny_pipe, tmp_path):
    from qlip.evaluation.intervals import metrics_with_intervals
    from qlip.evaluation.run_features import FEATURES_FILE, load_run_features

    config = EvalConfig(num_images=6, batch_size=3, steps=1)
    run_evaluation(tiny_pipe, PROMPTS, None, config, tmp_path / "a", _measures)
    metrics = run_evaluation(tiny_pipe, PROMPTS, None, config, tmp_path / "b", _measures,
                             reference_run=tmp_path / "a")
    intervals = metrics["intervals"]
    for key in ("fid", "sfid", "kid", "clip_score", "giqa", "fid_vs_reference",
                "kid_vs_reference", "psnr_vs_reference", "image_mse_vs_reference", "fab"):
        assert metrics[key] is not None and key in intervals, key
        low, high = intervals[key]
        assert low <= metrics[key] + 1e-9 and metrics[key] <= high + 1e-9, key
    assert "fid_floor" not in metrics  # no floor set given
    assert set(metrics["by_richness"]["0"]["intervals"]) >= {"clip_score", "giqa"}
    run = load_run_features(tmp_path / "b")
    assert run.features["generated"]["global"].shape == (6, 12)
    assert set(run.features) == {"generated", "real", "reference"}
    again = metrics_with_intervals(run, FAST)
    for key in ("fid", "kid", "clip_score", "fid_vs_reference"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-6), key
        assert again["intervals"][key] == pytest.approx(intervals[key], rel=1e-6), key
    assert (tmp_path / "b" / FEATURES_FILE).stat().st_size < 10_000


def test_a_reference_run_of_other_prompts_is_refused_before_generating(tiny_pipe, tmp_path):
    config = EvalConfig(num_images=2, batch_size=2, steps=1)
    run_evaluation(tiny_pipe, PROMPTS[:2], None, config, tmp_path / "a", _measures)
    other = [PROMPTS[0], EvalPrompt("something else")]
    with pytest.raises(ValueError, match="image 1 is 'a red circle' seed 1, this run's is "
                                         "'something else'"):
        run_evaluation(tiny_pipe, other, None, config, tmp_path / "b", _measures,
                       reference_run=tmp_path / "a")
    assert not list((tmp_path / "b").glob("images/*.png"))


def test_a_folder_of_another_run_is_refused(tiny_pipe, tmp_path):
    run_evaluation(tiny_pipe, PROMPTS[:2], None, EvalConfig(num_images=2, batch_size=2, steps=1),
                   tmp_path, _measures)
    other = [EvalPrompt("something else"), PROMPTS[1]]
    with pytest.raises(ValueError, match="other prompts or seeds"):
        run_evaluation(tiny_pipe, other, None, EvalConfig(num_images=2, steps=1), tmp_path,
                       _measures)


def test_a_folder_made_with_other_settings_is_refused_before_generating(tiny_pipe, tmp_path,
                                                                          monkeypatch):
    config = EvalConfig(num_images=2, batch_size=2, steps=1)
    run_evaluation(tiny_pipe, PROMPTS[:2], None, config, tmp_path, _measures)
    assert json.loads((tmp_path / "settings.json").read_text())["steps"] == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("generated although the settings differ")

    monkeypatch.setattr(harness_module, "generate", no_generation)
    for changed, key in ((EvalConfig(num_images=4, batch_size=2, steps=2), "steps"),
                         (EvalConfig(num_images=4, batch_size=2, steps=1, batch_mode="per_image"),
                          "batch_mode"),
                         (EvalConfig(num_images=4, batch_size=2, steps=1, guidance=7.5),
                          "guidance")):
        with pytest.raises(ValueError, match=f"{key}=.*new --out folder"):
            run_evaluation(tiny_pipe, PROMPTS[:4], None, changed, tmp_path, _measures)
    # a folder from before settings.json: its records' steps still refuse a mismatch
    (tmp_path / "settings.json").unlink()
    with pytest.raises(ValueError, match="steps=1"):
        run_evaluation(tiny_pipe, PROMPTS[:4], None,
                       EvalConfig(num_images=4, batch_size=2, steps=2), tmp_path, _measures)


def test_eval_cli_bad_inputs(tiny_pipe_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    real = tmp_path / "real"  # five image files: enough for GIQA, so the weights are asked for
    real.mkdir()
    for i in range(5):
        (real / f"{i}.png").write_bytes(b"")
    cases = [
        (["--model", str(tiny_pipe_dir), "--prompts", str(prompts)], "--real DIR is needed"),
        (["--model", str(tiny_pipe_dir)], "reference world's set"),
        (["--model", str(tiny_pipe_dir), "--prompts", str(prompts), "--real", str(tmp_path / "x")],
         "--real folder not found"),
        (["--model", str(tiny_pipe_dir), "--prompts", str(prompts), "--real", str(real)],
         "torch-fidelity"),
        (["--prompts", str(prompts), "--num-images", "0"], "at least 1"),
    ]
    for argv, needle in cases:
        try:
            code = main(["eval", "--device", "cpu", "--steps", "1", "--num-images", "2", "--out",
                         str(tmp_path / "o"), *argv])
        except SystemExit as exit_info:  # a flag's own parser refused it
            code = exit_info.code
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "Traceback" not in err, err


def test_heldout_selection_mixes_levels_and_the_floor_set_is_disjoint():
    from qlip.evaluation.cli import floor_prompts, select_prompts

    chosen = select_prompts("heldout", 300, world=True)
    floor = floor_prompts(300)
    assert len({p.richness for p in chosen}) == 5
    assert not {p.world_prompt.seed for p in chosen} & {p.world_prompt.seed for p in floor}
    assert [p.text for p in select_prompts("heldout", 300, world=True)] == [p.text for p in chosen]


def test_reference_world_runs_are_also_summarised_by_objects_in_the_scene(tiny_pipe, tmp_path):
    from qlip.world.domain import heldout_prompts

    world = heldout_prompts()
    chosen = [next(p for p in world if len(p.scene.objects) == n and p.richness == r)
              for n, r in ((1, 0), (1, 3), (2, 2), (3, 3))]
    prompts = [EvalPrompt(p.text, p.richness, p) for p in chosen]
    # the world's captions are longer than the tiny tokenizer's 32 tokens: cut them
    config = EvalConfig(num_images=4, batch_size=2, steps=1, guidance=3.0, truncate=True)
    metrics = run_evaluation(tiny_pipe, prompts, None, config, tmp_path, _measures)
    assert {k: v["num_images"] for k, v in metrics["by_objects"].items()} == {
        "1": 2, "2": 1, "3": 1}
    assert "## By objects in the scene" in (tmp_path / "metrics.md").read_text()
