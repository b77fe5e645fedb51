"""The evaluation harness: resumable generation, metrics against real images, reports."""

from .harness import EvalConfig, EvalPrompt, run_evaluation
from .store import ImageStore

__all__ = ["EvalConfig", "EvalPrompt", "ImageStore", "run_evaluation"]
