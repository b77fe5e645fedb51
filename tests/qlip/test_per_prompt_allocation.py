"""benchmarks/per_prompt_allocation.py: where a policy's bits go prompt by prompt, with or without
a random control of the policy's proportions beside it (the ablation rows have none)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from ..conftest import load_benchmark


@pytest.fixture(scope="module")
def allocation():
    return load_benchmark("per_prompt_allocation")


def _run(folder: Path, fab, psnr, richness, prompts) -> Path:
    folder.mkdir()
    save_file({"score.fab": np.asarray(fab, dtype=np.float64),
               "score.psnr_vs_reference": np.asarray(psnr, dtype=np.float64),
               "group.richness": np.asarray(richness, dtype=np.int64)},
              str(folder / "features.safetensors"))
    (folder / "generated.jsonl").write_text("".join(
        json.dumps({"index": i, "prompt": p, "seed": i}) + "\n" for i, p in enumerate(prompts)))
    return folder


def test_the_report_follows_the_bits_with_and_without_a_random_control(
        allocation, tmp_path, monkeypatch, capsys):
    n = 40
    richness = np.arange(n) % 2
    damage_psnr = np.where(richness == 0, 20.0, 35.0) + np.linspace(0, 1, n)  # level 0 damaged
    fab = 4.4 + 0.1 * (damage_psnr.max() - damage_psnr) / 15  # more bits where more damage
    prompts = [f"prompt {i}" for i in range(n)]
    policy = _run(tmp_path / "policy", fab, damage_psnr + 1.0, richness, prompts)
    damage = _run(tmp_path / "damage", np.full(n, 4.45), damage_psnr, richness, prompts)
    random = _run(tmp_path / "random", np.full(n, 4.45), damage_psnr + 0.5, richness, prompts)

    monkeypatch.setattr(sys, "argv", ["x", str(policy), "--damage", str(damage),
                                      "--resamples", "50", "--out", str(tmp_path / "a.json")])
    allocation.main()
    alone = json.loads((tmp_path / "a.json").read_text())
    assert alone["spearman_fab_damage"]["rho"] == pytest.approx(1.0)
    assert alone["by_richness"]["0"]["mean_fab"] > alone["by_richness"]["1"]["mean_fab"]
    assert "gain_over_random_by_extra_bits" not in alone and "random" not in alone["fab_std"]
    assert "gain over random" not in capsys.readouterr().out
    # a level where every prompt got one FAB has no correlation: null, not NaN
    flat = _run(tmp_path / "flat", np.where(richness == 0, 4.45, fab), damage_psnr, richness,
                prompts)
    monkeypatch.setattr(sys, "argv", ["x", str(flat), "--damage", str(damage), "--resamples",
                                      "50", "--out", str(tmp_path / "c.json")])
    allocation.main()
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0 |"))
    assert row.startswith("| 0 | 4.450 | ") and row.endswith("| – (one FAB) |")
    assert json.loads((tmp_path / "c.json").read_text())["by_richness"]["0"][
        "spearman_fab_damage"] is None

    monkeypatch.setattr(sys, "argv", ["x", str(policy), "--damage", str(damage), "--random",
                                      str(random), "--resamples", "50",
                                      "--out", str(tmp_path / "b.json")])
    allocation.main()
    both = json.loads((tmp_path / "b.json").read_text())
    assert both["mean_psnr_gain_over_random_db"] == pytest.approx(0.5)
    assert sum(q["images"] for q in both["gain_over_random_by_extra_bits"]) == n
    assert "Mean PSNR gain over random: +0.500 dB" in capsys.readouterr().out


def test_other_prompts_are_refused(allocation, tmp_path, monkeypatch):
    policy = _run(tmp_path / "policy", [4.4, 4.5], [30, 31], [0, 1], ["a", "b"])
    damage = _run(tmp_path / "damage", [4.4, 4.4], [30, 31], [0, 1], ["a", "c"])
    monkeypatch.setattr(sys, "argv", ["x", str(policy), "--damage", str(damage)])
    with pytest.raises(SystemExit, match="differ at image 1"):
        allocation.main()
