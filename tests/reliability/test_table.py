"""Every case of issue 17's table: bad input and faults get one clear line and exit 2 before
any work, caches never lie about what made them, and two runs never share a folder."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from qlip.files import LOCK_FILE, FolderLock

from .conftest import ROOT, quantize_argv, run_cli


def _gen(pipe_dir, out, *extra: str) -> list[str]:
    return ["generate", "a red circle", "--model", str(pipe_dir), "--device", "cpu",
            "--steps", "1", "--out", str(out), *extra]


def _refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_out_that_is_a_file_or_cannot_be_made_is_refused_before_loading(
        capsys, tmp_path, monkeypatch):
    import qlip.pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(qlip.pipeline, "load_pipeline", no_model)
    (tmp_path / "file").write_text("x")
    _refused(*run_cli(capsys, _gen("unused", tmp_path / "file")), "is a file, not a folder")
    _refused(*run_cli(capsys, _gen("unused", "/proc/x")), "/proc/x", "cannot make this folder")


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_damaged_quantized_state_names_the_file(capsys, quantized, tmp_path, damage):
    folder = tmp_path / "q"
    shutil.copytree(quantized, folder)
    state = folder / "quant_state.safetensors"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    _refused(*run_cli(capsys, _gen("unused", tmp_path / "g", "--quantized", str(folder))),
             str(state), "corrupt or truncated", "quantize the model again")


def test_version_that_is_not_a_number_is_refused(capsys, quantized, tmp_path):
    folder = tmp_path / "q"
    shutil.copytree(quantized, folder)
    config = folder / "quant_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"version": "banana"}))
    _refused(*run_cli(capsys, _gen("unused", tmp_path / "g", "--quantized", str(folder))),
             str(config), "'banana', not an integer")


def test_quantize_again_with_other_calibration_settings_captures_anew(
        capsys, tiny_pipe_dir, prompt_file, quantized, tmp_path):
    from qlip.methods.calib_data import CalibrationSet

    folder = tmp_path / "q"
    shutil.copytree(quantized, folder)
    cache = folder / "calibration.safetensors"
    before = CalibrationSet.load(cache)
    code, err = run_cli(capsys, quantize_argv(tiny_pipe_dir, prompt_file, folder, "--seed", "9"))
    assert code == 0, err
    assert "captured from other inputs (seed: 0 (cached) vs 9 (now)); capturing anew" in err
    recorded = json.loads((folder / "quant_config.json").read_text())["method_config"]
    assert CalibrationSet.saved_fingerprint(cache)["seed"] == recorded["calibration"]["seed"] == 9
    assert not before.latents.equal(CalibrationSet.load(cache).latents)  # other noise: new rows
    code, err = run_cli(capsys, quantize_argv(tiny_pipe_dir, prompt_file, folder, "--seed", "9"))
    assert code == 0 and "reusing the calibration capture" in err


_HOLDER = textwrap.dedent("""
    import sys, time
    from qlip.files import FolderLock
    with FolderLock(sys.argv[1], "qlip generate (test holder)"):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes our stdin
""")


def test_a_folder_in_use_by_another_process_is_refused(capsys, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run_cli(capsys, _gen("unused", out))
        _refused(code, err, "in use by another qlip process", f"pid {holder.pid}")
        code, err = run_cli(capsys, ["eval", "--num-images", "5", "--out", str(out)])
        _refused(code, err, "in use by another qlip process", f"pid {holder.pid}")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with FolderLock(out, "next"):  # released: the folder is free again
        pass


def test_a_stale_lock_of_a_killed_process_is_taken_over(capsys, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                              "command": "qlip eval", "since": "earlier"}))
    with FolderLock(out, "qlip eval"):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"taking over {out / LOCK_FILE}, left by pid {dead.pid}" in err
    assert not (out / LOCK_FILE).exists()


def test_two_runs_into_one_folder_refused_unless_overwrite(capsys, tiny_pipe_dir, tmp_path):
    out = tmp_path / "g"
    code, err = run_cli(capsys, ["generate", "a", "b", "c", "--model", str(tiny_pipe_dir),
                                 "--device", "cpu", "--steps", "1", "--out", str(out)])
    assert code == 0, err
    _refused(*run_cli(capsys, _gen(tiny_pipe_dir, out)), "is not empty (0000.png, 0001.png",
             "--overwrite")
    (out / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, _gen(tiny_pipe_dir, out, "--overwrite"))
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [e["image"] for e in report["images"]] == ["0000.png"]
    # the earlier run's other images are gone; the user's file stays; no lock left behind
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "notes.txt", "report.json"]


def test_eval_records_are_whole_and_never_duplicated(tmp_path):
    from PIL import Image

    from qlip.evaluation.store import ImageStore

    store = ImageStore(tmp_path)
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    store.add_batch([0, 1], images[:2], [{"prompt": "a", "seed": 0}, {"prompt": "b", "seed": 1}])
    store.add_batch([1, 2], images[1:], [{"prompt": "b", "seed": 1}, {"prompt": "c", "seed": 2}])
    lines = (tmp_path / "generated.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1, 2]
    data = store.path(2).read_bytes()
    store.path(2).write_bytes(data[: len(data) // 2])  # a torn PNG (as an older qlip left it)
    assert ImageStore(tmp_path).missing(3) == [2]


def test_two_evals_in_one_folder_the_second_is_refused(tmp_path):
    from qlip.files import FolderInUseError

    with FolderLock(tmp_path, "qlip eval"):
        with pytest.raises(FolderInUseError, match="in use by another qlip process"):
            with FolderLock(tmp_path, "qlip eval"):
                pass


def test_over_long_prompts_are_refused_or_cut_with_a_line_in_every_command(
        capsys, tiny_pipe_dir, quantized, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("a red circle " * 70 + "\n" + "a star\n")  # the tiny tokenizer: limit 32
    quantize = quantize_argv(tiny_pipe_dir, long, tmp_path / "q", "--calib-steps", "1",
                             "--calib-kept-steps", "1")
    _refused(*run_cli(capsys, quantize), "prompt 1 has 702 tokens", "limit of 32", "--truncate")
    code, err = run_cli(capsys, [*quantize, "--truncate"])
    assert code == 0 and "--truncate: 1 of 2 prompts are longer than" in err, err
    generate = ["generate", "--prompt-file", str(long), "--model", str(tiny_pipe_dir),
                "--device", "cpu", "--steps", "1", "--out", str(tmp_path / "g")]
    _refused(*run_cli(capsys, generate), "702 tokens", "--truncate")
    code, err = run_cli(capsys, [*generate, "--truncate"])
    assert code == 0 and "--truncate: 1 of 2 prompts" in err, err


def test_over_long_eval_prompts_are_refused_before_generating(tiny_pipe, tmp_path):
    from qlip.evaluation import EvalConfig, EvalPrompt, run_evaluation

    with pytest.raises(ValueError, match="702 tokens.*--truncate"):
        run_evaluation(tiny_pipe, [EvalPrompt("a red circle " * 70)], None,
                       EvalConfig(num_images=1, steps=1), tmp_path, measures_fn=None)
    assert not list((tmp_path / "images").glob("*.png"))


def test_a_real_set_too_small_for_giqa_is_refused_before_loading(capsys, tmp_path, monkeypatch):
    import qlip.pipeline
    from qlip.metrics import GMMGIQA

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the real set was checked")

    monkeypatch.setattr(qlip.pipeline, "load_pipeline", no_model)
    # the reference world renders one real image a prompt; GMM-GIQA fits 5 components to them
    _refused(*run_cli(capsys, ["eval", "--num-images", "4", "--out", str(tmp_path / "e")]),
             "--num-images 4 renders 4 real images", "--num-images 5 or more")
    (tmp_path / "p.txt").write_text("a red circle\n")
    real = tmp_path / "real"
    real.mkdir()
    for i in range(3):
        (real / f"{i}.png").write_bytes(b"")
    _refused(*run_cli(capsys, ["eval", "--model", "unused", "--prompts", str(tmp_path / "p.txt"),
                               "--real", str(real), "--out", str(tmp_path / "u")]),
             "holds 3 images", "at least 5")
    with pytest.raises(ValueError, match="needs at least 5 real images; got 4"):
        GMMGIQA().fit(torch.randn(4, 8))


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompts_are_refused_unless_allowed(capsys, tiny_pipe_dir, tmp_path, prompt):
    argv = ["generate", prompt, "--model", str(tiny_pipe_dir), "--device", "cpu", "--steps", "1",
            "--out", str(tmp_path / "g")]
    _refused(*run_cli(capsys, argv), "empty or only whitespace", "--allow-empty-prompt")
    code, err = run_cli(capsys, [*argv, "--allow-empty-prompt"])
    assert code == 0, err
    assert json.loads((tmp_path / "g" / "report.json").read_text())["images"][0]["prompt"] == prompt


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_guidance_must_be_finite_and_not_negative(capsys, tmp_path, value):
    for command in (["generate", "x"], ["eval"], ["quantize"], ["train-qlip"]):
        code, err = run_cli(capsys, [*command, f"--guidance={value}", "--out", str(tmp_path)])
        assert code == 2 and "argument --guidance: --guidance must be" in err, (command, err)


def test_prompt_file_that_is_not_utf8_is_named(capsys, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"a red circle\ncaf\xe9 au lait\n")
    _refused(*run_cli(capsys, ["generate", "--prompt-file", str(bad), "--model", "unused",
                               "--out", str(tmp_path / "g")]),
             str(bad), "not UTF-8 text (byte 0xe9 on line 2)")


def test_outputs_take_the_users_umask(capsys, quantized, tmp_path):
    old = os.umask(0o027)
    try:
        import torch

        from qlip.files import save_tensors, write_atomic

        save_tensors({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
        write_atomic(tmp_path / "a.json", "{}")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        assert modes == {"a.safetensors": 0o640, "a.json": 0o640}
    finally:
        os.umask(old)
    saved = {p.name: stat.S_IMODE(p.stat().st_mode) for p in quantized.iterdir() if p.is_file()}
    assert len(set(saved.values())) == 1, saved  # safetensors and JSON alike


def test_a_bootstrap_device_torch_cannot_parse_is_refused_at_parse_time(capsys, tmp_path):
    code, err = run_cli(capsys, ["eval", "--num-images", "1", "--bootstrap-device", "gpu0",
                                 "--out", str(tmp_path / "out")])
    assert code == 2 and "'gpu0' is not a device; give cpu, cuda or cuda:N" in err, err
    assert not (tmp_path / "out").exists()  # refused before any work
