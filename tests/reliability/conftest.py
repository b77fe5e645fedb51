"""Fixtures of the fault-injection battery: one quantized tiny model for the whole session, the
CLI run in-process with its exit code and stderr, and a subprocess runner that SIGKILLs a run at
a named point (``QLIP_CRASH_AT``, see ``qlip.files.crash_point``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from qlip.cli import main

from ..conftest import single_torch_thread

# transformers' own warnings go through a logging handler bound to an earlier test's stderr
# (its "--- Logging error ---" traceback is not qlip's); qlip's lines are what is checked here
diffusers_logging.set_verbosity_error()
transformers_logging.set_verbosity_error()

# one torch thread here and in every subprocess: the byte-identity checks compare runs of both
_one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)

ROOT = Path(__file__).resolve().parents[2]
BITS = "8,16,32"


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """``qlip ARGV`` in this process: (exit code, stderr). argparse's own refusals exit too."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def killed_at(point: str, argv: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python ARGV`` (from the repository root) and SIGKILL it at the crash point
    ``point``; the test fails if the run was not killed there."""
    env = {**os.environ, "QLIP_CRASH_AT": point, "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-2000:])
    return done


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    words = "red blue green circle square star left right small big".split()
    path.write_text("\n".join(f"a {words[i % 10]} {words[(i * 3) % 10]}" for i in range(12)) + "\n")
    return path


def quantize_argv(pipe_dir, prompt_file, out, *extra: str) -> list[str]:
    return ["quantize", "--model", str(pipe_dir), "--device", "cpu", "--abits", "8",
            "--abits-options", BITS, "--calib-prompts", str(prompt_file), "--calib-num", "2",
            "--calib-steps", "2", "--calib-kept-steps", "2", "--out", str(out), *extra]


@pytest.fixture(scope="session")
def quantized(tiny_pipe_dir, prompt_file, tmp_path_factory) -> Path:
    """An RTN W4A8 model of the tiny pipeline, bank {8, 16, 32}, made once (read-only for tests:
    copy it to damage it)."""
    out = tmp_path_factory.mktemp("quantized") / "w4a8"
    assert main(quantize_argv(tiny_pipe_dir, prompt_file, out)) == 0
    return out
