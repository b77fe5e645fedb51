"""An evaluation of the tiny pipeline with stand-in measures, run the same way by the kill test's
subprocess (``python tests/reliability/eval_driver.py PIPE OUT``) and in the test's process."""

from __future__ import annotations

import sys

from qlip.metrics.bootstrap import BootstrapConfig


def evaluate(pipe_dir, out) -> None:
    from qlip.evaluation import run_evaluation
    from qlip.pipeline import load_pipeline
    from tests.evaluation.test_harness import CONFIG, PROMPTS, _measures

    pipe = load_pipeline(str(pipe_dir), "cpu")
    pipe.set_progress_bar_config(disable=True)
    run_evaluation(pipe, PROMPTS, None, CONFIG, out, _measures, label="FP",
                   bootstrap=BootstrapConfig(resamples=20))


if __name__ == "__main__":
    evaluate(sys.argv[1], sys.argv[2])
