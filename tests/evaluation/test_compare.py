"""Paired comparisons: a run against itself, two draws of one distribution, a real difference,
and refusals of unpaired runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qlip.cli import main
from qlip.evaluation.compare import (
    CompareConfig,
    compare_runs,
    comparison_json,
    comparison_markdown,
)
from qlip.evaluation.intervals import DECIDING, decide, paired_differences, verdict
from qlip.evaluation.run_features import RunFeatures, pairs_digest
from qlip.metrics.bootstrap import BootstrapConfig, Interval

N = 200
PROMPTS = [f"prompt {i}" for i in range(N)]


def _run(seed: int, shift: float = 0.0, score_shift: float = 0.0) -> RunFeatures:
    rng = np.random.default_rng(seed)
    real = np.random.default_rng(99).normal(size=(N, 6))
    return RunFeatures(
        {"generated": {"global": rng.normal(size=(N, 6)) + shift},
         "real": {"global": real}},
        {"clip_score": rng.normal(0.1, 0.05, N) + score_shift},
        {"richness": np.zeros(N, dtype=int)},
        {"pairs": pairs_digest(PROMPTS, range(N)), "real_paired": "1"})


def _write(folder, run: RunFeatures, prompts=PROMPTS) -> str:
    folder.mkdir()
    run.save(folder)
    lines = [json.dumps({"index": i, "prompt": p, "seed": i}) for i, p in enumerate(prompts)]
    (folder / "generated.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


CONFIG = BootstrapConfig(resamples=200, dtype=__import__("torch").float64)


def test_a_run_against_itself_differs_by_zero_with_a_zero_width_interval():
    run = _run(0)
    for d in paired_differences(run, run, CONFIG):
        assert d.difference.estimate == 0 and d.difference.low == 0 and d.difference.high == 0
        assert d.verdict == f"not distinguishable at {N} images"


def test_two_draws_of_one_distribution_are_not_distinguishable():
    got = {d.name: d for d in paired_differences(_run(0), _run(1), CONFIG)}
    assert set(got) == {"clip_score", "fid", "kid"}
    assert all(d.verdict.startswith("not distinguishable") for d in got.values())


def test_a_real_difference_is_found_in_the_metrics_direction():
    better = _run(1, shift=0.0, score_shift=0.02)
    worse = _run(2, shift=0.6)
    got = {d.name: d.verdict for d in paired_differences(better, worse, CONFIG)}
    assert got == {"clip_score": "A better", "fid": "A better", "kid": "A better"}
    got = {d.name: d.verdict for d in paired_differences(worse, better, CONFIG)}
    assert got == {"clip_score": "B better", "fid": "B better", "kid": "B better"}


def test_verdict_uses_the_direction():
    above = Interval(1.0, 0.5, 1.5)
    assert verdict("psnr_vs_reference", above, 10) == "A better"
    assert verdict("perceptual_vs_reference", above, 10) == "B better"
    assert verdict("fid", Interval(0.1, -0.2, 0.4), 10) == "not distinguishable at 10 images"


def test_compare_command_prints_a_verdict_table(tmp_path, capsys):
    a = _write(tmp_path / "a", _run(1, score_shift=0.02))
    b = _write(tmp_path / "b", _run(2, shift=0.6))
    out = tmp_path / "cmp.json"
    assert main(["compare", a, b, "--resamples", "100", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| fid | lower |" in text and "A better" in text
    assert json.loads(out.read_text())["metrics"]["fid"]["verdict"] == "A better"


def test_runs_of_other_prompts_or_sizes_are_refused_naming_the_mismatch(tmp_path):
    a = _write(tmp_path / "a", _run(0))
    other = list(PROMPTS)
    other[7] = "another prompt"
    b = _write(tmp_path / "b", _run(1), other)
    with pytest.raises(ValueError, match="differ at image 7: 'prompt 7'"):
        compare_runs(CompareConfig(a, b))
    small = _run(1).subset(np.arange(50))
    c = _write(tmp_path / "c", small, PROMPTS[:50])
    with pytest.raises(ValueError, match="200 images .* 50"):
        compare_runs(CompareConfig(a, c))


def test_features_alone_are_compared_by_their_prompt_seed_digest(tmp_path):
    """A folder brought back without generated.jsonl (features only) is paired by the digest
    its features carry; a digest of other prompts is refused."""
    a = _write(tmp_path / "a", _run(1, score_shift=0.02))
    b = _write(tmp_path / "b", _run(2, shift=0.6))
    (tmp_path / "b" / "generated.jsonl").unlink()
    got = {d.name: d.verdict for d in compare_runs(CompareConfig(a, b, resamples=100)).differences}
    assert got["fid"] == "A better"
    other = _run(2)
    other.meta["pairs"] = pairs_digest(["another"] + PROMPTS[1:], range(N))
    c = tmp_path / "c"
    c.mkdir()
    other.save(c)
    with pytest.raises(ValueError, match="not of the same prompts and seeds"):
        compare_runs(CompareConfig(a, str(c)))
    other.meta.pop("pairs")
    d = tmp_path / "d"
    d.mkdir()
    other.save(d)
    with pytest.raises(FileNotFoundError, match="neither generated.jsonl nor a prompt/seed"):
        compare_runs(CompareConfig(a, str(d)))


def test_a_folder_without_features_is_refused_with_advice(tmp_path):
    (tmp_path / "old").mkdir()
    with pytest.raises(FileNotFoundError, match="evaluate the run again"):
        compare_runs(CompareConfig(str(tmp_path / "old"), str(tmp_path / "old")))


def test_recompute_metrics_rebuilds_metrics_json_from_the_features(tmp_path):
    from qlip.evaluation.harness import recompute_metrics
    from qlip.evaluation.intervals import metrics_with_intervals
    from qlip.evaluation.run_features import load_run_features

    folder = tmp_path / "run"
    _write(folder, _run(3, shift=0.3))
    with pytest.raises(FileNotFoundError, match="evaluate the run first"):
        recompute_metrics(folder, CONFIG)
    stale = {"fid": -1.0, "kid": -1.0, "label": "W4A8", "fid_floor": 12.5,
             "intervals": {"fid_floor": [10.0, 15.0]}, "notes": ["old"], "fab": 8.0}
    (folder / "metrics.json").write_text(json.dumps(stale))
    got = recompute_metrics(folder, CONFIG)
    expected = metrics_with_intervals(load_run_features(folder), CONFIG)
    assert got["fid"] == pytest.approx(expected["fid"]) and got["fid"] > 0
    assert got["kid"] == pytest.approx(expected["kid"])
    assert got["intervals"]["fid"] == pytest.approx(expected["intervals"]["fid"])
    # what the features cannot give again is kept, and the recomputation is noted
    assert got["label"] == "W4A8" and got["fid_floor"] == 12.5 and got["fab"] == 8.0
    assert got["intervals"]["fid_floor"] == [10.0, 15.0]
    assert got["notes"][0] == "old" and "recomputed" in got["notes"][-1]
    assert json.loads((folder / "metrics.json").read_text())["fid"] == pytest.approx(got["fid"])
    assert (folder / "metrics.md").is_file()


def test_the_decision_rule_keeps_quality_only_when_no_deciding_measure_is_worse():
    """docs/metrics.md's rule: kept when A is not worse on every measure against FP and on the
    text; reported-only measures (FID against real images) never decide; a missing deciding
    measure (no shared reference run) leaves it undecided."""
    tied = {m: "not distinguishable at 2000 images" for m in DECIDING}
    assert decide(tied).kept is True and decide(tied).overall == "not worse"
    assert decide({**tied, "fid": "B better", "sfid": "B better"}).kept is True  # reported only
    better = decide({**tied, "psnr_vs_reference": "A better"})
    assert better.kept is True and better.better == ("psnr_vs_reference",)
    assert better.overall == "better"
    worse = decide({**tied, "psnr_vs_reference": "A better", "alignment": "B better"})
    assert worse.kept is False and worse.worse == ("alignment",) and worse.overall == "worse"
    assert "worse than W4A16 at 2000 images on alignment" in worse.sentence("QLIP", "W4A16", 2000)
    partial = {k: v for k, v in tied.items() if k != "kid_vs_reference"}
    assert decide(partial).kept is None and decide(partial).missing == ("kid_vs_reference",)
    assert decide(partial).overall == "undecided"


def test_compare_ends_with_the_rules_verdict(tmp_path):
    """Runs without a shared reference (these have none) cannot be decided, and say so."""
    a = _write(tmp_path / "a", _run(1, score_shift=0.02))
    b = _write(tmp_path / "b", _run(2, shift=0.6))
    result = compare_runs(CompareConfig(a, b, resamples=100))
    assert result.decision.kept is None
    assert comparison_markdown(result).splitlines()[-1].startswith(
        "The decision rule cannot decide: psnr_vs_reference")
    assert comparison_json(result)["decision"]["quality_kept"] is None
