"""benchmarks/sd14_unet_step.py's variants take turns measuring (one GPU, one variant at a time);
a variant still compiling must not hold the others (on an H100 the real variants' first calls
ran past the step's time limit and nothing was measured)."""

import statistics
import time
from argparse import Namespace

import pytest

from ..conftest import load_benchmark


@pytest.fixture(scope="module")
def step_module():
    return load_benchmark("sd14_unet_step")


def _args(folder, index, barrier_s=30.0):
    return Namespace(sync_dir=str(folder), processes=3, index=index, barrier_s=barrier_s,
                     variants="bf16,w4a8_layers_real,w4a8_layers")


def test_a_variant_still_compiling_is_skipped_and_measures_late(step_module, tmp_path):
    Turn = step_module._Turn
    (tmp_path / "ready-bf16").touch()
    (tmp_path / "ready-w4a8_layers").touch()  # w4a8_layers_real (index 1) is still compiling
    start = time.time()
    order = []
    # places: round 0 is index 0, 1, 2; round 1 is rotated by one: index 2, 0, 1
    for r, index in ((0, 0), (0, 2), (1, 2), (1, 0)):  # the ready ones, each in its order
        with Turn(_args(tmp_path, index), r) as turn:
            order.append((r, index, turn.late))
    assert time.time() - start < 5  # no wait of barrier_s (30 s) for the missing variant
    assert not any(late for *_, late in order)
    assert Turn(_args(tmp_path, 0), 0)._read() == 5  # index 0's round-1 turn (place 4) passed on
    # the slow variant, ready now, takes its round-0 turn out of turn, at once
    (tmp_path / "ready-w4a8_layers_real").touch()
    start = time.time()
    with Turn(_args(tmp_path, 1), 0) as turn:
        assert turn.late
    assert time.time() - start < 5


def test_a_ready_variant_is_waited_for(step_module, tmp_path):
    """A turn whose variant is ready (compiled, measuring) is not skipped: the next waits."""
    Turn = step_module._Turn
    for name in ("bf16", "w4a8_layers_real", "w4a8_layers"):
        (tmp_path / f"ready-{name}").touch()
    start = time.time()
    with Turn(_args(tmp_path, 1, barrier_s=0.5), 0) as turn:  # place 1: index 0 has not gone
        assert not turn.late
    assert time.time() - start >= 0.5  # it waited its whole deadline
    assert Turn(_args(tmp_path, 0), 0)._read() == 2  # and passed the counter on after its turn


def _timed(ms):
    return {"median_ms": ms}


def test_the_summary_compares_with_channels_last_bf16_when_it_is_the_only_bf16(step_module, capsys):
    """The real step runs beside bf16 channels-last alone: ratios (time and peak memory) are
    then taken to it, and the best bf16 is its fastest mode."""
    results = {"variants": {
        "bf16_channels_last": {"eager": _timed(30.0), "graph": _timed(27.0),
                               "compiled": _timed(20.0), "compiled_graph": _timed(18.0),
                               "memory_mib": {"eager_peak": 2000.0, "compiled_peak": 1600.0}},
        "w4a8_layers_real": {"eager": _timed(90.0), "graph": _timed(81.0),
                             "compiled": _timed(60.0), "compiled_graph": _timed(54.0),
                             "memory_mib": {"eager_peak": 1000.0, "compiled_peak": 1200.0}}}}
    step_module.summarise(results)
    got = results["targets"]
    assert got["bf16_baseline"] == "bf16_channels_last"
    assert got["best_bf16"] == {"median_ms": 18.0, "what": "bf16_channels_last compiled_graph"}
    assert got["fastest_w4a8_layers_real_vs_best_bf16"] == pytest.approx(3.0)
    assert got["compiled_graph_w4a8_layers_real_vs_bf16"] == pytest.approx(3.0)
    assert got["eager_peak_memory_w4a8_layers_real_vs_bf16"] == pytest.approx(0.5)
    assert got["compiled_peak_memory_w4a8_layers_real_vs_bf16"] == pytest.approx(0.75)
    assert "w4a8_layers_real" in capsys.readouterr().out
    with pytest.raises(KeyError):  # no bf16 at all: nothing to compare with
        step_module.summarise({"variants": {"w4a8_layers_real": results["variants"]["w4a8_layers_real"]}})


def test_the_summary_names_the_variants_timed_out_of_turn(step_module, capsys):
    """A variant still compiling when its turn came measures later, beside the others (the
    eighteenth session's first real step on a fresh H100: 51.9 ms against 25.2 ms in a quiet
    rerun). The summary names it and says that its ratios are not to be reported."""
    quiet = {"eager": {**_timed(30.0), "rounds_out_of_turn": 0}, "rest_out_of_turn": False,
             "compiled_graph": _timed(18.0)}
    late = {"eager": {**_timed(90.0), "rounds_out_of_turn": 2}, "rest_out_of_turn": True,
            "compiled_graph": _timed(50.0)}
    eager_late = {"eager": {**_timed(90.0), "rounds_out_of_turn": 1}, "rest_out_of_turn": False,
                  "compiled_graph": _timed(25.0)}
    results = {"variants": {"bf16_channels_last": quiet, "w4a8_layers_real": late,
                            "w4a8_layers_real_packed": eager_late}}
    step_module.summarise(results)
    got = results["targets"]
    assert got["timed_out_of_turn"] == {"w4a8_layers_real": ["eager", "graph and compiled"],
                                        "w4a8_layers_real_packed": ["eager"]}
    assert "out of turn" in capsys.readouterr().out
    results["variants"] = {"bf16_channels_last": quiet, "w4a8_layers_real": eager_late | {
        "eager": {**_timed(90.0), "rounds_out_of_turn": 0}}}
    step_module.summarise(results)
    assert "timed_out_of_turn" not in results["targets"]


def test_the_summary_gives_each_compiled_ratio_an_interval_over_the_timed_calls(step_module):
    """With every timed call recorded, each compiled_graph ratio gets a 95% bootstrap interval
    that holds the ratio of medians and shrinks to it when the calls do not vary; records
    without the calls get none."""
    base = [18.0 + 0.1 * (i % 5) for i in range(20)]
    real = [54.0 + 0.3 * (i % 7) for i in range(20)]
    results = {"variants": {
        "bf16_channels_last": {"eager": _timed(30.0), "compiled_graph": {**_timed(18.2), "times": base}},
        "w4a8_layers_real": {"eager": _timed(90.0), "compiled_graph": {**_timed(54.9), "times": real}},
        "w4a8_layers_real_packed": {"eager": _timed(90.0), "compiled_graph": {
            **_timed(36.4), "times": [36.4] * 20}}}}
    step_module.summarise(results)
    got = results["targets"]
    low, high = got["intervals_95"]["compiled_graph_w4a8_layers_real_vs_bf16"]
    ratio = statistics.median(real) / statistics.median(base)
    assert low <= ratio <= high and high - low < 0.1 and low < high
    low, high = got["intervals_95"]["compiled_graph_w4a8_layers_real_packed_vs_bf16"]
    assert low <= 36.4 / statistics.median(base) <= high
    del results["variants"]["w4a8_layers_real"]["compiled_graph"]["times"]
    del results["variants"]["w4a8_layers_real_packed"]
    step_module.summarise(results)
    assert "intervals_95" not in results["targets"]


def test_a_parts_folder_is_summarised_without_a_gpu(step_module, tmp_path, monkeypatch):
    """``--summarise PARTS``: a run stopped by its time limit after its variants were timed
    (the twenty-third session's SDXL step) is summarised from its parts; a missing folder is
    refused before anything is written."""
    import json
    import sys

    parts = tmp_path / "unet_step.sdxl.b8.real.parts"
    parts.mkdir()
    (parts / "bf16_channels_last.json").write_text(json.dumps(
        {"eager": _timed(160.0), "compiled_graph": {**_timed(120.0), "times": [120.0] * 5}}))
    (parts / "w4a8_layers_real_fp8_fast_packed.json").write_text(json.dumps(
        {"eager": _timed(480.0), "compiled_graph": {**_timed(132.0), "times": [132.0] * 5}}))
    (parts / "turn").write_text("2")  # the turn counter beside them is not a variant
    out = tmp_path / "summary.json"
    monkeypatch.setattr(sys, "argv", ["sd14_unet_step.py", "--arch", "sdxl", "--batch", "8",
                                      "--summarise", str(parts), "--out", str(out)])
    step_module.main()
    got = json.loads(out.read_text())
    assert got["targets"]["compiled_graph_w4a8_layers_real_fp8_fast_packed_vs_bf16"] == pytest.approx(1.1)
    assert got["arch"] == "sdxl" and sorted(got["variants"]) == [
        "bf16_channels_last", "w4a8_layers_real_fp8_fast_packed"]
    monkeypatch.setattr(sys, "argv", ["sd14_unet_step.py", "--summarise", str(tmp_path / "no"),
                                      "--out", str(tmp_path / "other.json")])
    with pytest.raises(SystemExit):
        step_module.main()
    assert not (tmp_path / "other.json").exists()


def test_a_part_cut_before_its_timing_is_summarised_without_ratios(step_module, capsys):
    """A part whose variants were all still compiling at the limit (the twenty-fourth
    session's first target at batch 2) holds no times: the summary gives no ratios and does not
    fail, and a real variant timed beside an untimed bf16 gets none either."""
    partial = {"memory_mib": {"model": 1661.0}, "first_compile_s": 61.0, "partial": True}
    results = {"variants": {"bf16_channels_last": partial,
                            "w4a8_attention_fused": dict(partial)}}
    step_module.summarise(results)
    assert results["targets"] == {"bf16_baseline": "bf16_channels_last"}
    results = {"variants": {"bf16_channels_last": partial, "w4a8_layers": {
        "eager": _timed(90.0), "compiled": _timed(60.0), "compiled_graph": _timed(54.0)}}}
    step_module.summarise(results)
    got = results["targets"]
    assert not any(key.endswith("_vs_bf16") for key in got) and "best_bf16" not in got
    assert "w4a8_layers" in capsys.readouterr().out  # its times are still printed
