"""Flag parsers and helpers shared by the `qlip` commands (`quantize`, `generate`, `eval`,
`demo`); they hold no logic beyond turning text into config values."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from .quant import check_bits, parse_bits_list

DEFAULT_MODEL = "reference"


def bits_arg(what: str) -> Callable[[str], int]:
    """An argparse type for one bit-width flag: ``type=bits_arg("--abits")``."""
    def parse(text: str) -> int:
        try:
            return check_bits(int(text), what)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    return parse


SOFTMAX_FOLLOWS = "abits"  # --softmax-bits abits: QuantConfig.softmax_follows_abits


def softmax_bits_arg(text: str) -> int | str:
    """``--softmax-bits``: a bit-width, or ``abits`` (the probabilities at each unit's bits)."""
    if text == SOFTMAX_FOLLOWS:
        return text
    return bits_arg("--softmax-bits (a bit-width or 'abits')")(text)


def bits_list_arg(text: str) -> tuple[int, ...]:
    """An argparse type for ``--abits-options 8,16,32``."""
    try:
        return parse_bits_list(text, "--abits-options")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def device_name(name: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; anything else as given."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def read_prompt_file(path: str) -> list[str]:
    """The non-empty lines of a prompt file, stripped."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file not found: {file}")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {file} holds no prompts (one per line)")
    return prompts


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--device``, as every command that loads a pipeline takes them."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="local diffusers pipeline folder, hub id, or 'reference' (default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
