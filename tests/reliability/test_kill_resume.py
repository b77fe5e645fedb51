"""``kill -9`` (SIGKILL, in a subprocess) at chosen points of eval, quantize and QLIP training,
then a resumed run in this process: the results are byte-identical to an uninterrupted run. The
points are named by ``QLIP_CRASH_AT`` (``qlip.files.crash_point``): inside an eval's atomic
write of a batch's records, after its images (images without records and a temp file are left);
after a reconstruction unit; after a Q2B checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from qlip.cli import main

from .conftest import BITS, killed_at, quantize_argv

EVAL_DRIVER = "tests/reliability/eval_driver.py"


CLOCKS = {"timings.json"}  # wall times: a record of the run, never reproducible


def _files(folder, pattern: str = "*") -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob(pattern)) if p.is_file() and p.name not in CLOCKS}


@pytest.fixture(scope="module")
def straight_eval(tiny_pipe_dir, tmp_path_factory):
    from .eval_driver import evaluate

    out = tmp_path_factory.mktemp("eval") / "straight"
    evaluate(tiny_pipe_dir, out)
    return _files(out)


def test_eval_killed_then_resumed_is_byte_identical(tiny_pipe_dir, tmp_path, straight_eval,
                                                    capsys):
    from .eval_driver import evaluate

    out = tmp_path / "killed"
    # the 7th rename: batch 2's records (settings, 2 images, records, 2 images, records); its
    # images are on disk without records and the records' temp file is left behind
    killed_at("before-rename:7", [EVAL_DRIVER, str(tiny_pipe_dir), str(out)])
    assert not (out / "metrics.json").exists()
    assert len(list(out.glob(".generated.jsonl.*.tmp"))) == 1
    assert len(list((out / "images").glob("*.png"))) == 4
    assert len((out / "generated.jsonl").read_text().splitlines()) == 2
    evaluate(tiny_pipe_dir, out)
    assert "resuming" in capsys.readouterr().err
    assert _files(out) == straight_eval
    assert set(json.loads((out / "timings.json").read_text())) == {"generation", "features",
                                                                    "metrics"}


def test_quantize_killed_in_reconstruction_resumes_byte_identical(
        tiny_pipe_dir, prompt_file, tmp_path, capsys):
    def argv_to(out):
        return quantize_argv(tiny_pipe_dir, prompt_file, out, "--method", "qdiffusion",
                             "--recon-iters", "2", "--recon-samples", "4", "--act-tune-iters", "0")

    argv = argv_to(tmp_path / "killed")
    killed_at("reconstruction-unit:3", ["-m", "qlip.cli", *argv])
    assert len(list((tmp_path / "killed" / "reconstruction").glob("*.safetensors"))) == 3
    assert main(argv) == 0
    assert "reconstruction resumed: 3 units" in capsys.readouterr().err
    assert main(argv_to(tmp_path / "straight")) == 0
    assert _files(tmp_path / "killed", "quant_*") == _files(tmp_path / "straight", "quant_*")


def test_train_qlip_killed_at_a_checkpoint_resumes_byte_identical(
        tiny_pipe_dir, quantized, prompt_file, tmp_path):
    folders = {}
    for name in ("killed", "straight"):
        folders[name] = tmp_path / name
        shutil.copytree(quantized, folders[name])
    argv = ["train-qlip", "--model", str(tiny_pipe_dir), "--device", "cpu", "--prompts",
            str(prompt_file), "--num-prompts", "8", "--q2b-prompts", "2", "--steps", "2",
            "--chunk", "4", "--t2q-holdout", "0.25", "--label", "sensitivity", "--t2q-iters", "5", "--q2b-iters", "6",
            "--q2b-batch-size", "2", "--checkpoint-every", "2", "--bits", BITS, "--no-progress",
            "--quantized"]
    killed_at("q2b-checkpoint:2", ["-m", "qlip.cli", *argv, str(folders["killed"])])
    assert not (folders["killed"] / "qlip.json").exists()
    for folder in folders.values():
        assert main([*argv, str(folder)]) == 0
    assert _files(folders["killed"], "qlip.safetensors") == \
        _files(folders["straight"], "qlip.safetensors")


def test_a_copy_killed_before_its_rename_leaves_no_torn_file(tmp_path):
    # train-qlip copies the model's files into --out: a kill mid-copy must leave the old state
    # (no file), never a partial copy that a resumed job would take as the model
    import subprocess
    import sys

    source = tmp_path / "state.bin"
    source.write_bytes(os.urandom(1 << 20))
    target = tmp_path / "out" / "state.bin"
    target.parent.mkdir()
    code = ("import sys; from qlip.files import copy_atomic; "
            "copy_atomic(sys.argv[1], sys.argv[2])")
    killed = subprocess.run([sys.executable, "-c", code, str(source), str(target)],
                            env={**os.environ, "QLIP_CRASH_AT": "before-rename"})
    assert killed.returncode == -9 and not target.exists()
    from qlip.files import copy_atomic

    copy_atomic(source, target)
    assert target.read_bytes() == source.read_bytes()
    # (a killed copy's hidden temporary may stay beside it; it is never read as the model)
    assert [p.name for p in target.parent.iterdir() if not p.name.startswith(".")] == ["state.bin"]
