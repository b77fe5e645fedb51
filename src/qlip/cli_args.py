"""Flag parsers and helpers shared by the `qlip` commands (`quantize`, `generate`, `eval`,
`demo`); they hold no logic beyond turning text into config values."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from .nn import quant_units
from .pipeline.compiled import COMPILE_MODES
from .pipeline.quantized_model import ATTENTION_MODES, fused_attention_on
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


def finite_float(what: str, minimum: float | None = None) -> Callable[[str], float]:
    """An argparse type for a float flag: refuses nan and inf (and values under ``minimum``).
    ``type=finite_float("--guidance", 0)``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number; got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{what} must be a finite number; got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be at least {minimum:g}; got {text}")
        return value

    return parse


def int_at_least(what: str, minimum: int) -> Callable[[str], int]:
    """An argparse type for an integer flag of at least ``minimum``: ``int_at_least("--steps", 1)``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be at least {minimum}; got {value}")
        return value

    return parse


RESOLUTION_STEP = 8  # diffusers pipelines refuse a height or width that 8 does not divide


def resolution_arg(what: str) -> Callable[[str], int]:
    """An argparse type for ``--height`` / ``--width``: pixels, a positive multiple of 8."""
    def parse(text: str) -> int:
        value = int_at_least(what, RESOLUTION_STEP)(text)
        if value % RESOLUTION_STEP:
            raise argparse.ArgumentTypeError(f"{what} must be a multiple of {RESOLUTION_STEP} "
                                             f"pixels; got {value}")
        return value

    return parse


def add_resolution_args(p: argparse.ArgumentParser) -> None:
    """``--height`` and ``--width`` (default: the pipeline's own, e.g. 512 for SD 1.x)."""
    for flag in ("--height", "--width"):
        p.add_argument(flag, type=resolution_arg(flag), default=None,
                       help=f"image {flag[2:]} in pixels, a multiple of 8 (default: the "
                            "pipeline's own, e.g. 512 for SD 1.x, 1024 for SDXL)")


def add_prompt_args(p: argparse.ArgumentParser, what: str = "prompts") -> None:
    """``--truncate`` and ``--allow-empty-prompt``, as every command that reads prompts takes them."""
    p.add_argument("--truncate", action="store_true",
                   help=f"cut {what} longer than the tokenizer's limit (as CLIP pipelines do; a "
                        "line says how many) instead of refusing them")
    p.add_argument("--allow-empty-prompt", action="store_true",
                   help="accept empty or whitespace-only prompts: they mean unconditional "
                        "generation (refused by default)")


def output_folder(path: str, flag: str = "--out") -> Path:
    """``path`` as a folder qlip can write to, made if missing; refused before any work when it is
    a file or cannot be made or written."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is a file, not a folder; give a folder (new or empty)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {folder}: cannot make this folder ({err.strerror}); choose a "
                         "location you can write to") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder}: this folder is not writable; choose a location you "
                         "can write to")
    return folder


def device_name(name: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; anything else as given."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def torch_device_name(name: str) -> str:
    """An argparse type: a name ``torch.device`` parses (``cpu``, ``cuda``, ``cuda:1``), refused
    at parse time otherwise, before any work."""
    import torch

    try:
        torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device; give cpu, cuda or cuda:N") \
            from None
    return name


def read_prompt_file(path: str) -> list[str]:
    """The non-blank lines of a prompt file (UTF-8, one prompt a line: only ``\n`` ends a
    line), stripped; a file that is not UTF-8 text, or a line with a control character, is
    refused with the file and line named."""
    from .pipeline.prompts import check_prompt_text

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file not found: {file}")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is fine
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"prompt file {file} is not UTF-8 text (byte 0x{data[err.start]:02x} on "
                         f"line {line}); save it as UTF-8") from None
    prompts = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if line:
            check_prompt_text(line, f"prompt file {file}, line {number},")
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompt file {file} holds no prompts (one per line)")
    return prompts


def add_execution_args(p: argparse.ArgumentParser) -> None:
    """How a quantized model's layers run when sampling (`qlip generate`, `qlip eval`)."""
    p.add_argument("--packed-weights", action="store_true",
                   help="keep the weights of at most 4 bits as codes two per byte and free the FP "
                        "weights: the same images in less memory (each layer dequantizes at "
                        "every call)")
    p.add_argument("--real-kernels", action="store_true",
                   help="run the quantized layers in low-precision math on a CUDA GPU (Triton "
                        "kernels: int8 at A8 and below, the option read on the device; the model "
                        "channels-last): the simulation's quantized model; as fast as bf16 "
                        "only with --fp8 on GEMM-heavy UNets such as SDXL's "
                        "(docs/results/speed/)")
    p.add_argument("--fp8", action="store_true",
                   help="the Linear layers and 1x1 convs whose every option is A8 (weights of at "
                        "most 4 bits) run in fp8 e4m3 through torch._scaled_mm (the CPU, or an "
                        "Ada or Hopper GPU); with --real-kernels the other layers in int8. "
                        "Weights exact, activations an fp8 grid over the A8 range: not the "
                        "simulation's values. With --packed-weights each such layer unpacks "
                        "its own bytes to e4m3 at every call")
    p.add_argument("--attention", default="auto", choices=tuple(ATTENTION_MODES),
                   help="quantized attention's softmax·V: auto (default) through the fused "
                        "Triton kernel on a CUDA GPU, materialising the probabilities elsewhere; "
                        "fused (the kernel's two passes in PyTorch off the GPU); materialised "
                        "(the probability tensor, as before the twenty-first session). Fused is "
                        "faster and keeps the probabilities in fp32 before their quantizer")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="run the UNet under torch.compile in MODE: reduce-overhead (each step "
                        "replayed from a CUDA graph on a GPU), default, max-autotune or "
                        "max-autotune-no-cudagraphs. The first UNet call at a new image size stays "
                        "eager (its MACs are counted); the first batch pays the compile. "
                        "Where the speed figures of docs/results/speed/ "
                        "come from; images are the same model's, rounded a little differently")


def execution_label(args, unet=None) -> str:
    """How ``add_execution_args``' flags run the quantized layers, as reports record it; "fused
    attention" where quantized attention fuses on this device and ``unet`` (when given) has a
    quantized attention unit."""
    if not args.real_kernels:
        label = "simulated, fp8 A8 GEMMs" if args.fp8 else "simulated"
    else:
        label = "real kernels, fp8 A8 GEMMs" if args.fp8 else "real kernels"
    if fused_attention_on(args.attention, device_name(args.device)) and (
            unet is None or any(u.kind == "attention" for u in quant_units(unet).values())):
        label += ", fused attention"
    return label + (f", compiled ({args.compile})" if args.compile else "")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--device``, as every command that loads a pipeline takes them."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="local diffusers pipeline folder, hub id, or 'reference' (default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    """``--policy`` and its inputs (`qlip generate`, `qlip eval`): ``PolicyConfig``'s fields."""
    from .pipeline.quantized_model import POLICIES

    p.add_argument("--policy", choices=POLICIES, default="auto",
                   help="auto: --abits, else QLIP when the folder holds qlip.json, else the "
                        "model's abits; random-matched: bits drawn per (step, layer) from the "
                        "proportions of --bits-from's run; per-layer: the fixed bits per layer of "
                        "--assignment")
    p.add_argument("--bits-from", help="random-matched: an eval or generate folder with "
                   "bits.safetensors (e.g. QLIP's eval); its requested bits are the reference")
    p.add_argument("--policy-seed", type=int_at_least("--policy-seed", 0), default=0,
                   help="random-matched: the seed of the draw (with the prompt's text)")
    p.add_argument("--assignment", help="per-layer: the JSON file of `qlip per-layer`")


def policy_config_from_args(args):
    """The PolicyConfig the flags say (one field per flag)."""
    from .pipeline.quantized_model import PolicyConfig

    return PolicyConfig(policy=args.policy, bits_from=args.bits_from, seed=args.policy_seed,
                        assignment=args.assignment)
