"""SDXL through every command, as a user runs it: quantize (rtn and qdiffusion at their smallest
settings) -> generate -> eval --real, on a tiny random SDXL pipeline (``text_time`` added
conditioning, two text towers); Inception is qlip.testing.TinyInception (nothing downloaded)."""

import json

import numpy as np
import pytest
from PIL import Image

from qlip.cli import main
from qlip.metrics import InceptionExtractor
from qlip.testing import TinyInception, build_tiny_sdxl_pipeline

SMALLEST = {"rtn": [], "qdiffusion": ["--recon-iters", "1", "--recon-samples", "2",
                                      "--act-tune-iters", "0"]}


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    build_tiny_sdxl_pipeline(root).save_pretrained(root / "pipe")
    (root / "prompts.txt").write_text("a red circle\ntwo blue squares\n")
    real = root / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(real / f"{i}.png")
    return root


@pytest.mark.parametrize("method", ["rtn", "qdiffusion"])
def test_sdxl_quantize_generate_eval(method, sdxl_dir, tmp_path, monkeypatch):
    import qlip.evaluation.measures as measures

    monkeypatch.setattr(measures, "inception_extractor",
                        lambda weights, device: InceptionExtractor(network=TinyInception()))
    model, prompts = str(sdxl_dir / "pipe"), str(sdxl_dir / "prompts.txt")
    common = ["--model", model, "--device", "cpu"]
    assert main(["quantize", *common, "--method", method, *SMALLEST[method], "--calib-prompts",
                 prompts, "--calib-num", "2", "--calib-steps", "2", "--calib-kept-steps", "2",
                 "--abits-options", "8,16", "--out", str(tmp_path / "q")]) == 0
    config = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert config["method"] == method
    assert main(["generate", "a red circle", *common, "--quantized", str(tmp_path / "q"),
                 "--abits", "16", "--steps", "2", "--out", str(tmp_path / "g")]) == 0
    report = json.loads((tmp_path / "g" / "report.json").read_text())["images"][0]
    assert report["fab"] == 16.0 and report["steps"] == 2 and report["bitops_t"] > 0
    assert main(["eval", *common, "--quantized", str(tmp_path / "q"), "--prompts", prompts,
                 "--num-images", "4", "--batch-size", "2", "--steps", "2", "--real",
                 str(sdxl_dir / "real"), "--bootstrap-resamples", "2",
                 "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and np.isfinite(metrics["fid"]) and metrics["fid"] > 0
    assert np.isfinite(metrics["sfid"]) and metrics["fab"] == 8.0


def test_sdxl_qlip_trains_and_samples(sdxl_dir, tmp_path):
    """train-qlip on SDXL (T2Q reads text_encoder_2's projected pooled embedding; Q2B's
    trajectories and the sensitivity labels replay added_cond_kwargs), then QLIP generates."""
    model = str(sdxl_dir / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{c} {s}\n" for c in ("a red", "two blue", "one green", "a pink")
                               for s in ("circle", "square")))
    common = ["--model", model, "--device", "cpu"]
    assert main(["quantize", *common, "--abits-options", "8,16,32", "--calib-prompts",
                 str(prompts), "--calib-num", "2", "--calib-steps", "2", "--calib-kept-steps", "2",
                 "--out", str(tmp_path / "q")]) == 0
    assert main(["train-qlip", *common, "--quantized", str(tmp_path / "q"), "--bits", "8,16,32",
                 "--prompts", str(prompts), "--num-prompts", "8", "--q2b-prompts", "2",
                 "--steps", "2", "--label", "sensitivity", "--t2q-iters", "2", "--q2b-iters", "2",
                 "--t2q-holdout", "0.5", "--chunk", "8", "--no-progress"]) == 0
    assert main(["generate", "a red circle", "two blue squares", *common, "--quantized",
                 str(tmp_path / "q"), "--steps", "2", "--batch-mode", "per_image",
                 "--out", str(tmp_path / "g")]) == 0
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    assert report["policy"].startswith("QLIP")
    from qlip.pipeline.generate import load_generation_bits

    bits, requested, units = load_generation_bits(tmp_path / "g")
    assert bits.shape == (2, 2, len(units)) and set(np.unique(requested)) <= {8, 16, 32}
    assert np.array_equal(bits, requested)  # per_image: each image at what QLIP asked for it
