"""The CLI: a happy path on a tiny pipeline folder, and every bad input gets a message, not a
traceback, and a non-zero exit."""

import json

import pytest

from qlip.cli import main


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\ntwo blue squares\n")
    return path


def _fails(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_quantize_then_generate_writes_images_and_report(tiny_pipe_dir, prompt_file, tmp_path, capsys):
    qdir = tmp_path / "q"
    code = main(["quantize", "--model", str(tiny_pipe_dir), "--wbits", "4", "--abits", "8",
                 "--abits-options", "8,16", "--calib-prompts", str(prompt_file), "--calib-num", "2",
                 "--calib-steps", "3", "--calib-kept-steps", "2", "--device", "cpu",
                 "--out", str(qdir)])
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "gen"
    code = main(["generate", "a red circle", "a star", "--model", str(tiny_pipe_dir), "--quantized",
                 str(qdir), "--abits", "16", "--steps", "2", "--guidance", "3", "--seed", "5",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert [e["seed"] for e in report["images"]] == [5, 6]
    assert all(e["fab"] == 16.0 and e["bitops_t"] > 0 for e in report["images"])
    assert (out / "0000.png").is_file() and (out / "0001.png").is_file()
    from qlip.pipeline.generate import load_generation_bits

    bits, requested, names = load_generation_bits(out)  # each image's bits per step and unit
    assert bits.shape == (2, 2, len(names)) and names == report["units"]
    assert (bits == 16).all() and (requested == 16).all()
    assert [e["bits_row"] for e in report["images"]] == [0, 1]


def test_missing_model_folder(capsys, tmp_path):
    _fails(capsys, ["generate", "x", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
           "no such model folder")


def test_folder_that_is_not_a_pipeline(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    _fails(capsys, ["generate", "x", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out")],
           "not a diffusers pipeline folder")


def test_pipeline_that_is_not_text_to_image(capsys, tmp_path):
    folder = tmp_path / "ddpm"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
         "scheduler": ["diffusers", "DDPMScheduler"]}))
    _fails(capsys, ["generate", "x", "--model", str(folder), "--out", str(tmp_path / "out")],
           "not a text-to-image", "DDPMPipeline")


@pytest.mark.parametrize("flag,value", [("--wbits", "1"), ("--abits", "17"), ("--abits", "x")])
def test_bits_out_of_range(capsys, tmp_path, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", flag, value, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "bits" in capsys.readouterr().err


def test_bad_bit_options(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["quantize", "--abits-options", "8,40", "--out", str(tmp_path / "out")])
    assert "abits-options" in capsys.readouterr().err
    _fails(capsys, ["quantize", "--model", "x", "--abits", "4", "--abits-options", "8,16",
                    "--calib-prompts", "none.txt", "--out", str(tmp_path / "out")],
           "abits 4 must be one of abits_options")
    _fails(capsys, ["quantize", "--model", "x", "--calib-prompts", "none.txt", "--out",
                    str(tmp_path)], "prompt file not found")


def test_empty_prompt_list(capsys, tiny_pipe_dir, tmp_path):
    _fails(capsys, ["generate", "--model", str(tiny_pipe_dir), "--out", str(tmp_path / "out")],
           "no prompts given")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    _fails(capsys, ["quantize", "--model", str(tiny_pipe_dir), "--calib-prompts", str(empty),
                    "--out", str(tmp_path / "out")], "holds no prompts")


def test_prompt_longer_than_the_tokenizer_limit(capsys, tiny_pipe_dir, tmp_path):
    long_prompt = "a red circle " * 10  # the tiny tokenizer: one token per character, limit 32
    _fails(capsys, ["generate", long_prompt, "--model", str(tiny_pipe_dir), "--steps", "1",
                    "--device", "cpu", "--out", str(tmp_path / "out")], "limit of 32", "--truncate")
    code = main(["generate", long_prompt, "--model", str(tiny_pipe_dir), "--steps", "1",
                 "--device", "cpu", "--truncate", "--out", str(tmp_path / "ok")])
    assert code == 0


def test_quantized_folder_missing_or_abits_without_it(capsys, tiny_pipe_dir, tmp_path):
    _fails(capsys, ["generate", "x", "--model", str(tiny_pipe_dir), "--quantized",
                    str(tmp_path / "none"), "--device", "cpu", "--out", str(tmp_path / "out")],
           "not a qlip quantized model folder")
    _fails(capsys, ["generate", "x", "--model", str(tiny_pipe_dir), "--abits", "8",
                    "--device", "cpu", "--out", str(tmp_path / "out")], "--abits needs --quantized")
    for command in (["generate", "x"], ["eval", "--num-images", "2"]):
        _fails(capsys, command + ["--model", str(tiny_pipe_dir), "--packed-weights", "--device",
                                  "cpu", "--out", str(tmp_path / "packed")],
               "--packed-weights needs --quantized")
        assert not (tmp_path / "packed").exists()  # refused before any work
        _fails(capsys, command + ["--model", str(tiny_pipe_dir), "--real-kernels", "--device",
                                  "cpu", "--out", str(tmp_path / "real")],
               "--real-kernels needs --quantized")
        # the kernels need a CUDA GPU: refused before the folder is even read
        _fails(capsys, command + ["--model", str(tiny_pipe_dir), "--quantized",
                                  str(tmp_path / "none"), "--real-kernels", "--device", "cpu",
                                  "--out", str(tmp_path / "real")],
               "--real-kernels runs Triton kernels on a CUDA GPU", "run without it")
        assert not (tmp_path / "real").exists()
        _fails(capsys, command + ["--model", str(tiny_pipe_dir), "--fp8", "--device", "cpu",
                                  "--out", str(tmp_path / "real")], "--fp8 needs --quantized")
        assert not (tmp_path / "real").exists()
        # a per-image choice would run the real layers in the simulation: refused, not hidden
        _fails(capsys, command + ["--model", str(tiny_pipe_dir), "--quantized",
                                  str(tmp_path / "none"), "--fp8", "--batch-mode", "per_image",
                                  "--device", "cpu", "--out", str(tmp_path / "real")],
               "--fp8 runs one bit choice a batch", "use --batch-mode max")
        assert not (tmp_path / "real").exists()
