"""``qlip eval`` over 2 processes (torchrun, gloo on CPU) equals the single-process run image for
image, record for record and metric for metric, resuming a folder a single process began."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qlip.cli import main
from qlip.evaluation.shard import Shard
from qlip.nn import QuantConfig
from qlip.pipeline import CalibrationConfig, QuantizeJob, quantize_pipeline

from ..conftest import single_torch_thread
from .sharded_eval_driver import tiny_inception

# the launched workers run one torch thread (OMP_NUM_THREADS=1): so does this process, as the
# float sums of a CPU matmul depend on how many threads split them
_one_thread = pytest.fixture(autouse=True)(single_torch_thread)

DRIVER = Path(__file__).with_name("sharded_eval_driver.py")
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def _eval_args(pipe_dir, quantized, prompts, real, out, count):
    return ["eval", "--model", str(pipe_dir), "--device", "cpu", "--quantized", str(quantized),
            "--prompts", str(prompts), "--num-images", str(count), "--batch-size", "2",
            "--steps", "2", "--guidance", "3", "--real", str(real), "--bootstrap-resamples", "3",
            "--out", str(out)]


def _images(folder):
    return [np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))]


def _records(folder):
    lines = (folder / "generated.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_two_process_eval_equals_the_single_process_run(tiny_pipe, tiny_pipe_dir, tmp_path,
                                                        monkeypatch):
    import qlip.evaluation.measures as measures

    monkeypatch.setattr(measures, "inception_extractor", tiny_inception)
    quantize_pipeline(tiny_pipe, PROMPTS, QuantizeJob(
        quant=QuantConfig(wbits=4, abits=8), calibration=CalibrationConfig(
            num_prompts=2, num_inference_steps=2, num_kept_steps=2, guidance=3.0)),
        tmp_path / "q", progress=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # GIQA's mixture needs more real images than components
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(real / f"{i}.png")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    args = lambda out, n: _eval_args(tiny_pipe_dir, tmp_path / "q", prompts, real, out, n)  # noqa: E731
    assert main(args(single, 7)) == 0
    assert main(args(sharded, 2)) == 0  # a single process begins; two ranks resume it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", str(DRIVER), *args(sharded, 7)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming" in run.stderr and run.stdout.count("wrote metrics.json") == 1  # rank 0
    assert not list(sharded.glob("generated.rank*.jsonl"))  # merged into generated.jsonl
    a, b = _images(single), _images(sharded)
    assert len(a) == len(b) == 7 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert _records(single) == _records(sharded)
    metrics = [json.loads((f / "metrics.json").read_text()) for f in (single, sharded)]
    assert metrics[0]["fid"] == metrics[1]["fid"] and metrics[0]["fab"] == metrics[1]["fab"]
    assert (single / "bits.safetensors").read_bytes() == (sharded / "bits.safetensors").read_bytes()


def test_shard_from_the_launchers_environment():
    assert Shard.from_env({}) == Shard(0, 1, 0)
    shard = Shard.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert [shard.owns(k) for k in range(4)] == [False, True, False, True]
    assert shard.device("cuda") == "cuda:1" and shard.device("cpu") == "cpu"
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        Shard.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="not an integer"):
        Shard.from_env({"WORLD_SIZE": "two"})
